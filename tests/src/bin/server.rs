//! The `fedhive` server binary, built into the e2e package so its tests can spawn it.

fn main() -> std::process::ExitCode {
    fedhive_server::cli::main()
}
