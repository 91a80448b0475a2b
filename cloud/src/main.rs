fn main() -> std::process::ExitCode {
    fedhive_cloud::cli::main()
}
