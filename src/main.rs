//! The `hospes` command line: parses arguments, runs one subcommand, maps errors to exit
//! codes (2: bad input such as an invalid spec; 1: any other failure).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::vm::Outcome;
use vmm::VmmError;

#[derive(Parser)]
#[command(name = "hospes", version, about = "microVMs for services that move between peers while they run")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the microVM a service spec describes and run it until it stops.
    Run {
        /// The service spec (TOML).
        spec: PathBuf,
    },
    /// Validate a service spec without starting anything.
    Check {
        /// The service spec (TOML).
        spec: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOSPES_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hospes: {e}");
            match e {
                VmmError::Spec(_) | VmmError::NoDefaultGuest { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run(command: Command) -> Result<ExitCode, VmmError> {
    match command {
        Command::Check { spec } => {
            let s = vmm::spec::load(&spec)?;
            println!(
                "{}: service {:?}, {} vCPU, {} MiB, {} drive(s), {} network interface(s): ok",
                spec.display(),
                s.name,
                s.vcpus,
                s.memory_mib,
                s.drives.len(),
                s.nets.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { spec } => {
            let s = vmm::spec::load(&spec)?;
            let files = vmm::vm::boot_files(&s)?;
            let outcome = vmm::vm::run(&s, &files)?;
            match outcome {
                Outcome::PowerOff => eprintln!("hospes: guest {:?} powered off", s.name),
                Outcome::Reset => eprintln!("hospes: guest {:?} rebooted; a microVM stops on reboot", s.name),
                Outcome::Signal(sig) => eprintln!("hospes: stopped guest {:?} on signal {sig}", s.name),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
