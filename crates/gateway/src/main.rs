//! The `herald` binary: everything lives in the gateway library.

fn main() -> std::process::ExitCode {
    herald_gateway::cli::main()
}
