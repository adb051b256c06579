//! The `tessera` binary: parse arguments, run, exit with the documented code.

#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    tessera_cli::harden();
    let cli = match tessera_cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(tessera_cli::usage_error(e)),
    };
    std::process::exit(tessera_cli::run(cli));
}
