//! The `dbward` command line. Everything it runs lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit code for a bad configuration (EX_USAGE-like, as sysexits' EX_CONFIG is 78 but 64 is what
/// operators' scripts for this tool expect).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "dbward", version, about = "Postgres connections with short-lived credentials from Vault/OpenBao")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, env = "DBWARD_CONFIG")]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "text", env = "DBWARD_LOG_FORMAT")]
        log_format: LogFormat,
    },
    /// Validate the configuration file and exit (0: valid, 64: invalid).
    Validate {
        #[arg(long, env = "DBWARD_CONFIG")]
        config: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn load(path: &std::path::Path) -> Result<dbward::config::Config, ExitCode> {
    dbward::config::Config::load(path).map_err(|e| {
        eprintln!("dbward: invalid config {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match load(&config) {
            Ok(_) => {
                println!("{}: valid", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config, log_format } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(log_format);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(async {
                let app = match dbward::app::App::new(cfg) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("dbward: invalid config {}: {e}", config.display());
                        return ExitCode::from(EXIT_CONFIG);
                    }
                };
                match dbward::app::run(app, stop_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "dbward cannot run");
                        eprintln!("dbward: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
