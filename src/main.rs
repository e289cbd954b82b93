//! The `dbward` command line. Everything it runs lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit code for a bad configuration (EX_USAGE-like, as sysexits' EX_CONFIG is 78 but 64 is what
/// operators' scripts for this tool expect).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "dbward",
    version,
    about = "Postgres connections with short-lived credentials from Vault/OpenBao"
)]
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
    /// Check against the real Vault and databases that the config works: login, capabilities on
    /// every path, credential reads, one upstream connection each (0: all pass, 1: a check
    /// failed, 64: invalid config).
    Check {
        #[arg(long, env = "DBWARD_CONFIG")]
        config: PathBuf,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Warnings (short TTLs, clock skew, unused policy paths) fail the check too.
        #[arg(long)]
        strict: bool,
        /// Database to connect to for entries without `dbname` (default: postgres).
        #[arg(long)]
        dbname: Option<String>,
        /// Instead of the live checks, compare Vault's policy NAME with what the config needs
        /// (read with $VAULT_TOKEN or $BAO_TOKEN if set, else with the config's own login).
        #[arg(long, value_name = "NAME")]
        diff_policy: Option<String>,
    },
    /// Print the minimal Vault policy (HCL) the config needs.
    Policy {
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
        Command::Check {
            config,
            json,
            strict,
            dbname,
            diff_policy,
        } => check_command(config, json, strict, dbname, diff_policy),
        Command::Policy { config } => match load(&config) {
            Ok(cfg) => {
                print!("{}", dbward::policy::render_hcl(&cfg, &config.display().to_string()));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
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
            let rt = runtime(cfg.proxy.worker_threads).expect("tokio runtime");
            rt.block_on(async {
                let app = match dbward::app::App::new(cfg) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("dbward: invalid config {}: {e}", config.display());
                        return ExitCode::from(EXIT_CONFIG);
                    }
                };
                // SIGHUP re-reads the config file; a bad one is logged and the old one kept.
                // The handler is installed here, before anything is bound: installed inside the
                // task it could come after the listeners, and a SIGHUP sent by a deploy script
                // as soon as dbward listens would kill it (the default action).
                let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
                tokio::spawn({
                    let app = app.clone();
                    let path = config.clone();
                    async move {
                        let Ok(mut hup) = hup else {
                            return;
                        };
                        while hup.recv().await.is_some() {
                            tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
                            dbward::systemd::reloading();
                            app.reload_file(&path).await;
                            dbward::systemd::ready("configuration reloaded");
                        }
                    }
                });
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

/// The daemon's runtime. One thread (the default) is a `current_thread` runtime, an event loop
/// like PgBouncer's: a session's socket events are handled on the thread that polls its task,
/// with no work stealing and no futex wake-ups of a parked second worker, which cost 1-4 µs per
/// relayed transaction (benches/README.md). More threads are a work-stealing runtime, for
/// entries whose clients need more than one core.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build()
}

/// `dbward check`: 0 when every check passes, 1 when one fails, 64 for a bad config.
fn check_command(
    config: PathBuf,
    json: bool,
    strict: bool,
    dbname: Option<String>,
    diff_policy: Option<String>,
) -> ExitCode {
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let policy_reader_token = diff_policy.as_ref().and_then(|_| {
        ["VAULT_TOKEN", "BAO_TOKEN"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
            .map(|t| secrecy::SecretString::from(t.trim().to_string()))
    });
    let opts = dbward::check::Options {
        config_path: config.clone(),
        dbname,
        diff_policy,
        policy_reader_token,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = match rt.block_on(dbward::check::run(&cfg, &opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dbward: invalid config {}: {e}", config.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json(strict)).expect("JSON values serialize")
        );
    } else {
        print!("{}", report.render_text(strict));
    }
    if report.ok(strict) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
