//! The `hospes` command line: parses arguments, runs one subcommand, maps errors to exit
//! codes (2: bad input such as an invalid spec; 1: any other failure).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::vm::Outcome;
use vmm::VmmError;

#[derive(Parser)]
#[command(
    name = "hospes",
    version,
    about = "microVMs for services that move between peers while they run"
)]
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
    /// Benchmarks in the nested test rig (benches/): print figures, never pass or fail.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Boot time and memory beyond guest RAM, hospes vs QEMU (HOSPES_BENCH_RUNS, default 5).
    Boot,
    /// Disk, network and CPU: native vs the guest under hospes vs under QEMU; a markdown
    /// table and PNG charts (HOSPES_BENCH_RUNS, default 5). Needs `hospes-iotool` next to
    /// this binary (`cargo build --release -p hospes-bench --bin hospes-iotool`) or in
    /// HOSPES_IOTOOL.
    Io {
        /// Directory for the PNG charts.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    // HOSPES_LOG=error|warn|info|debug|trace; a plain level keeps the binary (and the VMM's
    // resident memory) free of a regex engine.
    let level = std::env::var("HOSPES_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .init();
    let result = match Cli::parse().command {
        Command::Bench { which } => {
            return match bench(which) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hospes bench: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Check { spec } => check(&spec),
        Command::Run { spec } => run(&spec),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hospes: {e}");
            match e {
                VmmError::Spec(_) | VmmError::NoDefaultGuest { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn bench(which: BenchCommand) -> anyhow::Result<()> {
    use anyhow::Context;
    let hospes = std::env::current_exe().context("cannot find the running hospes binary")?;
    let runs = std::env::var("HOSPES_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut progress = |line: &str| eprintln!("{line}");
    match which {
        BenchCommand::Boot => {
            let report = bench::boot::run(&hospes, runs.unwrap_or(5), &mut progress)?;
            println!("\n{}", report.markdown());
        }
        BenchCommand::Io { out } => {
            let iotool = match std::env::var_os("HOSPES_IOTOOL") {
                Some(p) => PathBuf::from(p),
                None => hospes.with_file_name("hospes-iotool"),
            };
            anyhow::ensure!(
                iotool.is_file(),
                "no I/O tool at {}: build it with `cargo build --release -p hospes-bench --bin hospes-iotool` \
                 (into the same target directory as hospes) or set HOSPES_IOTOOL",
                iotool.display()
            );
            let mut params = bench::io::IoParams::default();
            if let Some(runs) = runs {
                params.runs = runs;
            }
            let report = bench::io::run(&hospes, &iotool, &out, &params, &mut progress)?;
            println!("\n{}", report.markdown());
            for log in &report.failure_logs {
                eprintln!("\n{log}");
            }
            for chart in &report.charts {
                println!("chart: {}", chart.display());
            }
        }
    }
    Ok(())
}

/// `hospes check`: validates a spec and summarizes it.
fn check(spec: &Path) -> Result<(), VmmError> {
    let s = vmm::spec::load(spec)?;
    println!(
        "{}: service {:?}, {} vCPU, {} MiB, {} drive(s), {} network interface(s): ok",
        spec.display(),
        s.name,
        s.vcpus,
        s.memory_mib,
        s.drives.len(),
        s.nets.len()
    );
    Ok(())
}

/// `hospes run`: boots the spec's VM and reports how it ended.
fn run(spec: &Path) -> Result<(), VmmError> {
    let s = vmm::spec::load(spec)?;
    vmm::vm::check_host()?;
    let files = vmm::vm::boot_files(&s)?;
    match vmm::vm::run(&s, &files)? {
        Outcome::PowerOff => eprintln!("hospes: guest {:?} powered off", s.name),
        Outcome::Reset => eprintln!(
            "hospes: guest {:?} rebooted; a microVM stops on reboot",
            s.name
        ),
        Outcome::Signal(sig) => eprintln!("hospes: stopped guest {:?} on signal {sig}", s.name),
    }
    Ok(())
}
