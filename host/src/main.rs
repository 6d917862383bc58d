fn main() -> std::process::ExitCode {
    graft_host::cli::main()
}
