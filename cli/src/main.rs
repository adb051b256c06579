//! The `tessera` binary: parse arguments, run, exit with the documented code.

#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let cli = tessera_cli::Cli::parse();
    std::process::exit(tessera_cli::run(cli));
}
