//! `fieldrack`: parse the command line, run the command (see [`cli`]),
//! exit with its code.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = cli::exit::report(runtime.block_on(cli::run(args)));
    // Dropping a runtime waits for every blocking task (an import stuck
    // reading a file would hold the process forever): give them a bounded
    // grace, then exit regardless. `agent::run` has already flushed the
    // store by now.
    runtime.shutdown_timeout(node_agent::agent::RUNTIME_SHUTDOWN_GRACE);
    code
}
