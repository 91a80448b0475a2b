//! The `fedhive-cloud` worker binary, built into the e2e package so its tests can spawn (and
//! SIGKILL) it.

fn main() -> std::process::ExitCode {
    fedhive_cloud::cli::main()
}
