//! `fedhive`: the aggregation server binary (a thin shell over [`fedhive_server::cli`]).

fn main() -> std::process::ExitCode {
    fedhive_server::cli::main()
}
