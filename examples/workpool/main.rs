//! The workpool command line: a drop-in for the seed's `manager`, `worker` and
//! `generate-tls-certificates` subcommands, plus `demo`, which runs a manager and two
//! workers in this process on loopback with fresh certificates.
//!
//! ```text
//! cargo run --release --example workpool -- demo
//! cargo run --release --example workpool -- generate-tls-certificates --number-of-workers 2 --hostname localhost
//! cargo run --release --example workpool -- manager --security-pool-certificate host-cert.pem \
//!     --security-pool-key host-key.pem --security-worker-certificates worker-0-cert.pem worker-1-cert.pem
//! cargo run --release --example workpool -- worker --security-pool-certificate host-cert.pem \
//!     --security-worker-certificate worker-0-cert.pem --security-worker-key worker-0-key.pem
//! ```
//!
//! A certificate given to `--security-worker-certificates`,
//! `--security-submitter-certificates` or `--security-pool-certificate` is pinned:
//! accepted only as itself. Issuers go to `--security-worker-ca`,
//! `--security-submitter-ca` and `--security-pool-ca`. A certificate the manager trusts
//! only as a worker's cannot submit jobs, and one it trusts only as a submitter's cannot
//! take them.
//!
//! The manager's console is one loop on one thread: it takes the lines a reader thread
//! gets from stdin, the pool's events, signals and every job's events, and it alone
//! writes to stdout and stderr (buffered, flushed whenever it has nothing left to do).
//! Human output is cut into lines as the bytes come, in time linear in them; a line
//! longer than [`MAX_LINE`] is printed in pieces of at most that, so what the console
//! holds per job stays bounded whatever the job prints. It waits on the started jobs
//! and the oldest queued ones, and looks at the rest of the queue in turns (see
//! [`WATCHED_QUEUED`]), so that a turn of the loop does not cost in proportion to the
//! queue.
//!
//! Set `RUST_LOG=debug` for more log lines (they go to stderr).

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgAction, Args, Parser, Subcommand};
use crossbeam_channel::{Receiver, Select, TryRecvError, bounded, unbounded};
use serde::Serialize;
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use workpool::job::{JobEvent, JobId, JobSpec, JobState, Outcome, Stream};
use workpool::manager::{Manager, ManagerConfig, ManagerEvent, WorkerInfo};
use workpool::tls::{
    DEFAULT_VALIDITY_DAYS, Identity, PeerTrust, generate_manager_certificate,
    generate_submitter_certificate, generate_worker_certificate,
};
use workpool::worker::{Worker, WorkerConfig};

mod remote;
mod terminal;
use remote::{Handle, Pool};

/// The longest piece of a line that human output holds back waiting for its newline;
/// a longer line is printed in pieces of at most this many bytes, each on a line of its
/// own with the job's prefix.
const MAX_LINE: usize = 64 << 10;

/// How many events the console takes from one job, or lines from stdin, before it looks
/// at the others again.
const BURST: usize = 64;

/// How many of the jobs that have not started yet the console waits on, oldest first,
/// besides every job that has started: this many, or as many as have started if that is
/// more (about as many as will start next). Waiting on a channel, or looking at it,
/// costs a little for each, so that neither grows with the queue the younger ones are
/// looked at [`QUEUED_POLL_BATCH`] at a time every [`QUEUED_POLL`], in turn. A job that
/// starts among them (with a higher priority, or for a worker with tags the older ones
/// lack) is printed a little late; its output waits for the console meanwhile (in its
/// bounded channel, then paused on its worker).
const WATCHED_QUEUED: usize = 64;
const QUEUED_POLL: Duration = Duration::from_millis(10);
const QUEUED_POLL_BATCH: usize = 1024;

/// What the console writes through before it writes to stdout or stderr.
const OUT_BUFFER: usize = 64 << 10;

const CONSOLE_HELP: &str = "\
STDIN: each non-empty line is a job, submitted at once (`/bin/bash -c LINE` on a worker).
  exit               shut down gracefully (queued jobs are rejected, running ones finish);
                     any letter case (EXIT, Exit)
  :tags a,b          jobs after this line need workers with tags a and b (`:tags` clears)
  :platform P        jobs after this line need platform P, e.g. linux-x86_64 (`:platform` clears)
  :timeout 30s       jobs after this line get SIGTERM after 30 s, SIGKILL 5 s later (`:timeout`
                     clears; 500ms, 2m, 1h, 1m30s, or a number of seconds)
  :env NAME=VALUE    jobs after this line get this variable (repeat for more; `:env` clears)
  :priority N        jobs after this line have priority N (higher first; default 0)
  :retries N         jobs after this line run again up to N times if their worker is lost
  :cancel ID         cancel job ID (queued: it never starts; running: TERM, then KILL)
  :jobs              list queued and running jobs
  :workers           list the connected workers
  :status            workers, slots, jobs by state and outcome, queue wait, bytes streamed
  :help              this list
  ::SCRIPT           a job whose script begins with `:` (`:: > out.txt` runs `: > out.txt`)
At the end of stdin the manager waits for every job to end, then exits 0. SIGTERM or SIGINT
is `exit`, then the manager exits 128+N (a second one exits at once).
With --serve the manager does not read stdin: it serves until SIGTERM or SIGINT, which shut
it down as `exit` does, then it exits 0.
With a journal (--journal FILE; with --serve by default, unless --no-journal) a job is taken
only once it is on disk, and shutting down ends no job: queued jobs stay queued, running jobs
go on on their workers, and the manager started again on the same journal goes on with them.";

const SUBMIT_AFTER_HELP: &str = "\
Exit status: the job's own exit code; 128+N if it was killed by signal N; 124 if it timed
out; 125 if it was cancelled; 126 if it could not start; 122 if its worker was lost; 123 if
it was rejected (or contact with the manager was lost). 130 or 143 after SIGINT or SIGTERM
here (the job is cancelled first); 1 if the manager could not be reached, refused this
certificate or did not take the job (the reason on stderr); 2 for a usage error. With
--array of more than one index, or jobs read from stdin: 0 if every job succeeded, else
1, with a summary line of the outcomes on stderr.

Interactive jobs: -i forwards this command's stdin to the job as it comes, and closes the
job's stdin at its end of file (if the job closes its stdin first, forwarding stops). -t
gives the job a terminal (stdout and stderr merged on it) of this terminal's size, or 24x80
if stdin and stdout are not terminals, and follows window size changes. -it together, on a
terminal, makes this terminal raw until the job ends (or this command ends any other way):
every key goes to the job, so Ctrl-C interrupts the job's program, not this command, as
with `ssh -t` or `kubectl exec -it`; to cancel the job, `workpool cancel ID` or SIGTERM
here. -t without -i: the job's stdin is closed at once and this terminal is left as it is
(Ctrl-C cancels the job, as without -t). -it with a stdin that is not a terminal: a note on
stderr, then stdin is forwarded as it is (the job still gets a terminal). SIGTERM, SIGHUP
or SIGQUIT here cancel the job and put this terminal back; the status is then 128+N.";

const WORKER_AFTER_HELP: &str = "\
SIGTERM or SIGINT drains the worker: it takes no new jobs, lets the running ones finish, then
exits. A second SIGTERM or SIGINT stops it at once: running jobs are killed and cleaned up.";

const GENERATE_AFTER_HELP: &str = "\
Writes host-cert.pem host-key.pem worker-0-cert.pem worker-0-key.pem ... and, with
--number-of-submitters, submitter-1-cert.pem submitter-1-key.pem ...
The manager's certificate is for server authentication only, the workers' and the
submitters' for client authentication only: neither is accepted in the other's place.
The manager tells workers from submitters by the list it trusts each in
(--security-worker-* or --security-submitter-*).";

/// workpool: run shell commands on a pool of workers over mutual TLS
#[derive(Parser, Debug)]
#[command(
    name = "workpool",
    disable_help_flag = true,
    disable_version_flag = true,
    after_help = "Run `workpool SUBCOMMAND --help` for a subcommand's options."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print help
    #[arg(long, action = ArgAction::Help, global = true, display_order = 1000)]
    help: Option<bool>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Accept workers and run the jobs read from stdin, one per line (or, with --serve,
    /// run as a service)
    #[command(disable_help_flag = true, after_help = CONSOLE_HELP)]
    Manager(ManagerArgs),
    /// Connect to a manager and run its jobs (reconnects by itself)
    #[command(disable_help_flag = true, after_help = WORKER_AFTER_HELP)]
    Worker(WorkerArgs),
    /// Write self-signed certificates for a manager and its workers
    #[command(disable_help_flag = true, after_help = GENERATE_AFTER_HELP)]
    GenerateTlsCertificates(GenerateArgs),
    /// A manager and two workers in this process, on loopback, with fresh certificates,
    /// running a short showcase (streaming output, queueing, tag routing, a failing job)
    #[command(disable_help_flag = true)]
    Demo(DemoArgs),
    /// Run a job on a remote manager's pool, as a submitter: its output comes back as
    /// it is written, and its exit status is this command's (see --help)
    #[command(disable_help_flag = true, after_help = SUBMIT_AFTER_HELP)]
    Submit(remote::SubmitArgs),
    /// Follow a job this submitter certificate submitted: what it kept, then the rest
    #[command(disable_help_flag = true)]
    Attach(remote::AttachArgs),
    /// List the jobs that have not ended
    #[command(disable_help_flag = true)]
    Jobs(remote::QueryArgs),
    /// List the connected workers
    #[command(disable_help_flag = true)]
    Workers(remote::QueryArgs),
    /// The manager's numbers
    #[command(disable_help_flag = true)]
    Status(remote::QueryArgs),
    /// Cancel a job this submitter certificate submitted
    #[command(disable_help_flag = true)]
    Cancel(remote::CancelArgs),
}

#[derive(Args, Debug)]
struct ManagerArgs {
    /// Address to listen on
    #[arg(short = 'h', long, value_name = "HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on
    #[arg(short, long, value_name = "PORT", default_value_t = 9001, value_parser = number::<u16>)]
    port: u16,
    /// The manager's certificate (PEM)
    #[arg(long, value_name = "FILE")]
    security_pool_certificate: Option<PathBuf>,
    /// The manager's private key (PEM)
    #[arg(long, value_name = "FILE")]
    security_pool_key: Option<PathBuf>,
    /// Self-signed worker certificates to pin: each is accepted only as itself, never as
    /// an issuer
    #[arg(long, value_name = "FILE", num_args = 1..)]
    security_worker_certificates: Vec<PathBuf>,
    /// CA certificates whose issued worker certificates are accepted (at least one of
    /// these two options, unless submitters are trusted)
    #[arg(long, value_name = "FILE", num_args = 1..)]
    security_worker_ca: Vec<PathBuf>,
    /// Self-signed submitter certificates to pin: each may submit jobs (not take them),
    /// accepted only as itself, never as an issuer
    #[arg(long, value_name = "FILE", num_args = 1..)]
    security_submitter_certificates: Vec<PathBuf>,
    /// CA certificates whose issued submitter certificates may submit jobs (not take
    /// them)
    #[arg(long, value_name = "FILE", num_args = 1..)]
    security_submitter_ca: Vec<PathBuf>,
    /// One JSON object per line on stdout
    #[arg(long)]
    json: bool,
    /// Do not read stdin: serve until SIGTERM or SIGINT (with a journal at the default
    /// path unless --journal or --no-journal says otherwise)
    #[arg(long)]
    serve: bool,
    /// Keep accepted jobs in this journal (an SQLite file, created if missing): a restart
    /// goes on with the queue and the running jobs [default with --serve:
    /// $STATE_DIRECTORY/journal.sqlite, else $XDG_STATE_HOME/workpool/journal.sqlite, else
    /// ~/.local/state/workpool/journal.sqlite; none without --serve]
    #[arg(long, value_name = "FILE", conflicts_with = "no_journal")]
    journal: Option<PathBuf>,
    /// Keep no journal, even with --serve: a restart loses the queue
    #[arg(long)]
    no_journal: bool,
    /// How long the jobs of a worker whose link dropped (or of every worker, after a
    /// restart with a journal) wait for it to come back [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    reconnect_grace: Option<Duration>,
    /// How long an ended job stays in the journal [default: 1h]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    journal_retention: Option<Duration>,
    /// Most ended jobs the journal keeps [default: 10000]
    #[arg(long, value_name = "N", value_parser = number::<usize>)]
    journal_retention_count: Option<usize>,
    /// Serve Prometheus metrics at http://ADDR/metrics
    #[arg(long, value_name = "ADDR")]
    metrics_address: Option<String>,
    /// Connections one worker certificate may hold [default: 4]
    #[arg(long, value_name = "N", value_parser = number::<usize>)]
    max_connections_per_certificate: Option<usize>,
    /// Sessions one submitter certificate may hold, connected or within their grace
    /// [default: 64]
    #[arg(long, value_name = "N", value_parser = number::<usize>)]
    max_sessions_per_certificate: Option<usize>,
    /// Most heartbeats a second to hear from idle workers; beyond it heartbeats, their
    /// timeout and the reconnect grace are stretched (0: no limit) [default: 2000]
    #[arg(long, value_name = "N", value_parser = number::<u32>)]
    max_heartbeats_per_second: Option<u32>,
    /// No TLS at all (anyone who reaches the port can take jobs)
    #[arg(long)]
    insecure_plaintext: bool,
}

/// Where the manager is and how it is recognised: the worker's and the submitter's flags.
#[derive(Args, Debug)]
struct PoolArgs {
    /// The manager's host
    #[arg(short = 'h', long, value_name = "HOST", default_value = "127.0.0.1")]
    host: String,
    /// The manager's port
    #[arg(short, long, value_name = "PORT", default_value_t = 9001, value_parser = number::<u16>)]
    port: u16,
    /// The manager's self-signed certificate to pin (PEM): accepted only as itself, never
    /// as an issuer
    #[arg(long, value_name = "FILE")]
    security_pool_certificate: Option<PathBuf>,
    /// A CA whose issued manager certificate is accepted (repeatable; at least one of
    /// these two options)
    #[arg(long, value_name = "FILE")]
    security_pool_ca: Vec<PathBuf>,
}

impl PoolArgs {
    /// What the manager's certificate must be: the pinned one, or one a CA issued.
    fn trust(&self) -> Result<PeerTrust, Failure> {
        if self.security_pool_certificate.is_none() && self.security_pool_ca.is_empty() {
            return Err(usage(
                "--security-pool-certificate is required (or --security-pool-ca, or --insecure-plaintext)",
            ));
        }
        let mut trust =
            PeerTrust::pinned_pem_files(self.security_pool_certificate.iter()).map_err(failed)?;
        for ca in &self.security_pool_ca {
            trust.add_ca_pem_file(ca).map_err(failed)?;
        }
        Ok(trust)
    }
}

#[derive(Args, Debug)]
struct WorkerArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// This worker's certificate (PEM)
    #[arg(long, value_name = "FILE")]
    security_worker_certificate: Option<PathBuf>,
    /// This worker's private key (PEM)
    #[arg(long, value_name = "FILE")]
    security_worker_key: Option<PathBuf>,
    /// Name shown to the manager [default: HOSTNAME-PID]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// A tag jobs can require (repeatable)
    #[arg(long, value_name = "TAG")]
    tag: Vec<String>,
    /// Jobs run at once
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = number::<u32>)]
    slots: u32,
    /// Runs held beyond the slots, each started the moment a slot frees (0 to 1024)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = number::<u32>)]
    ahead: u32,
    /// Do not check that the manager's certificate names HOST
    #[arg(long)]
    no_verify_hostname: bool,
    /// Run every job as this user, its primary group and no other group, so that jobs
    /// cannot read this worker's key (the worker must be started as root)
    #[arg(long, value_name = "NAME")]
    job_user: Option<String>,
    /// No TLS at all
    #[arg(long)]
    insecure_plaintext: bool,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// How many worker certificates
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = number::<usize>)]
    number_of_workers: usize,
    /// How many submitter certificates (submitter-1-cert.pem ...)
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = number::<usize>)]
    number_of_submitters: usize,
    /// The manager's host name (also valid: localhost, 127.0.0.1)
    #[arg(long, value_name = "HOST", required = true)]
    hostname: String,
    /// Where to write them
    #[arg(long, value_name = "DIR", default_value = ".")]
    output_dir: PathBuf,
    /// How long they are valid
    #[arg(long, value_name = "N", default_value_t = DEFAULT_VALIDITY_DAYS, value_parser = number::<u32>)]
    days: u32,
    /// Replace files that exist already (they are replaced, never written through; keys
    /// are new files of mode 0600)
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// After the showcase, keep reading jobs from stdin like `manager`
    #[arg(long)]
    interactive: bool,
    /// One JSON object per line on stdout
    #[arg(long)]
    json: bool,
}

/// A number option's parser, with the error message the CLI has always given.
fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not a valid number"))
}

/// A command-line failure: the message, and whether it was the user's input (exit 2).
struct Failure {
    message: String,
    usage: bool,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        usage: true,
    }
}

fn failed(e: impl std::fmt::Display) -> Failure {
    Failure {
        message: e.to_string(),
        usage: false,
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("workpool: error: {}", usage_message(&e));
            return ExitCode::from(2);
        }
    };
    // The demo is about job output; the daemons log what they do.
    let default_log = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_log)).init();
    let result = match cli.command {
        Command::Manager(a) => run_manager(a),
        Command::Worker(a) => run_worker(a).map(|()| ExitCode::SUCCESS),
        Command::GenerateTlsCertificates(a) => generate(a).map(|()| ExitCode::SUCCESS),
        Command::Demo(a) => demo(a),
        Command::Submit(a) => remote::submit(a),
        Command::Attach(a) => remote::attach(a),
        Command::Jobs(a) => remote::query(a, "jobs"),
        Command::Workers(a) => remote::query(a, "workers"),
        Command::Status(a) => remote::query(a, "status"),
        Command::Cancel(a) => remote::cancel(a),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("workpool: error: {}", f.message);
            ExitCode::from(if f.usage { 2 } else { 1 })
        }
    }
}

/// One line for a usage error that clap found (its own rendering spans several).
fn usage_message(e: &clap::Error) -> String {
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(v)) => v.join(", "),
        _ => String::new(),
    };
    // "--port <PORT>" -> "--port"
    let flag = |s: String| s.split(' ').next().unwrap_or_default().to_string();
    let arg = context(ContextKind::InvalidArg);
    match e.kind() {
        ErrorKind::UnknownArgument if arg.starts_with('-') => {
            format!("unknown option {arg:?}; try --help")
        }
        ErrorKind::UnknownArgument => format!("unexpected argument {arg:?}; try --help"),
        ErrorKind::InvalidSubcommand => format!(
            "unknown subcommand {:?}; try --help",
            context(ContextKind::InvalidSubcommand)
        ),
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            "a subcommand is needed (manager, worker, generate-tls-certificates, demo); try --help"
                .into()
        }
        ErrorKind::MissingRequiredArgument => {
            let flags: Vec<String> = arg.split(", ").map(|a| flag(a.to_string())).collect();
            format!("{} is required", flags.join(", "))
        }
        ErrorKind::InvalidValue if context(ContextKind::InvalidValue).is_empty() => {
            format!("{} needs a value", flag(arg))
        }
        ErrorKind::ValueValidation => match std::error::Error::source(e) {
            Some(why) => format!("{}: {why}", flag(arg)),
            None => format!(
                "{}: {:?} is not valid",
                flag(arg),
                context(ContextKind::InvalidValue)
            ),
        },
        ErrorKind::ArgumentConflict => {
            let other = context(ContextKind::PriorArg);
            if other.is_empty() || other == arg {
                format!("{} given more than once", flag(arg))
            } else {
                format!("{} cannot be used with {}", flag(arg), flag(other))
            }
        }
        _ => {
            // clap's own words, first line, without its "error: ".
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            first.strip_prefix("error: ").unwrap_or(first).to_string()
        }
    }
}

fn run_manager(a: ManagerArgs) -> Result<ExitCode, Failure> {
    // A journal that reaches a file size limit (`ulimit -f`) fails its write (EFBIG, a
    // submission refused with the reason) instead of killing the manager.
    // SAFETY: setting a signal's disposition to SIG_IGN takes no handler code; no thread
    // has started yet.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // Before any thread starts, so that every thread inherits the mask and only the
    // signal thread takes SIGINT and SIGTERM.
    let signals = block_signals();
    let listen = if a.host.contains(':') {
        format!("[{}]:{}", a.host, a.port)
    } else {
        format!("{}:{}", a.host, a.port)
    };
    let mut config = if a.insecure_plaintext {
        ManagerConfig::insecure_plaintext(listen)
    } else {
        let why = " (or --insecure-plaintext)";
        let cert = a
            .security_pool_certificate
            .ok_or_else(|| usage(format!("--security-pool-certificate is required{why}")))?;
        let key = a
            .security_pool_key
            .ok_or_else(|| usage(format!("--security-pool-key is required{why}")))?;
        let (pinned, cas) = (a.security_worker_certificates, a.security_worker_ca);
        let (submitters, submitter_cas) =
            (a.security_submitter_certificates, a.security_submitter_ca);
        if pinned.is_empty() && cas.is_empty() && submitters.is_empty() && submitter_cas.is_empty()
        {
            return Err(usage(
                "--security-worker-certificates is required (or --security-worker-ca, \
                 --security-submitter-certificates, --security-submitter-ca, or --insecure-plaintext)",
            ));
        }
        let identity = Identity::from_pem_files(cert, key).map_err(failed)?;
        let trust = |pinned: Vec<PathBuf>, cas: Vec<PathBuf>| -> Result<PeerTrust, Failure> {
            let mut trust = PeerTrust::pinned_pem_files(pinned).map_err(failed)?;
            for ca in cas {
                trust.add_ca_pem_file(ca).map_err(failed)?;
            }
            Ok(trust)
        };
        ManagerConfig::new(listen, identity, trust(pinned, cas)?)
            .submitter_trust(trust(submitters, submitter_cas)?)
    };
    config.metrics_addr = a.metrics_address;
    if let Some(n) = a.max_sessions_per_certificate {
        config.max_sessions_per_certificate = n;
    }
    if let Some(n) = a.max_connections_per_certificate {
        config.max_connections_per_certificate = n;
    }
    if let Some(n) = a.max_heartbeats_per_second {
        config.max_heartbeats_per_second = n;
    }
    config.journal = match (a.journal, a.no_journal, a.serve) {
        (Some(path), _, _) => Some(path),
        (None, false, true) => Some(default_journal()?),
        _ => None,
    };
    if let Some(d) = a.reconnect_grace {
        config.reconnect_grace = d;
    }
    if let Some(d) = a.journal_retention {
        config.journal_retention = d;
    }
    if let Some(n) = a.journal_retention_count {
        config.journal_retention_count = n;
    }
    let journal = config.journal.clone();
    let manager = Arc::new(Manager::bind(config).map_err(failed)?);
    let (sig_tx, sig_rx) = unbounded();
    std::thread::spawn(move || {
        loop {
            if sig_tx.send(wait_signal(&signals)).is_err() {
                return;
            }
        }
    });
    let m = manager.clone();
    let mut console = Console::new(manager.clone(), a.json, Box::new(move || m.shutdown()));
    console.journal = journal;
    // SAFETY: isatty only reads the state of descriptor 1; any value is a valid argument.
    if !a.json && unsafe { libc::isatty(1) } == 1 {
        show_progress(manager.clone());
    }
    let input = if a.serve {
        if !a.json {
            eprintln!(
                "workpool manager listening on {}; serving until SIGTERM or SIGINT",
                manager.local_addr()
            );
        }
        None
    } else {
        if !a.json {
            eprintln!(
                "workpool manager listening on {}; one job per line, `exit` to quit, `:help` for directives",
                manager.local_addr()
            );
        }
        Some(read_lines(Vec::new(), Some(std::io::stdin())))
    };
    let ended = console.run(input, Some(sig_rx));
    Ok(match ended {
        Stop::Signal(sig) if !a.serve => ExitCode::from(128 + sig as u8),
        _ => ExitCode::SUCCESS,
    })
}

/// Where `manager --serve` keeps its journal unless told: systemd's state directory
/// (`StateDirectory=`), else the XDG state folder; its folder is made if missing.
fn default_journal() -> Result<PathBuf, Failure> {
    let nonempty = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty());
    let dir = if let Some(d) = nonempty("STATE_DIRECTORY") {
        // systemd lists one folder per `StateDirectory=` entry, separated by colons.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        PathBuf::from(first)
    } else if let Some(d) = nonempty("XDG_STATE_HOME") {
        PathBuf::from(d).join("workpool")
    } else if let Some(home) = nonempty("HOME") {
        PathBuf::from(home).join(".local/state/workpool")
    } else {
        return Err(usage(
            "no folder for the journal: set --journal FILE (or STATE_DIRECTORY, XDG_STATE_HOME or HOME), or --no-journal",
        ));
    };
    std::fs::create_dir_all(&dir).map_err(|e| {
        failed(format!(
            "cannot make the journal's folder {}: {e} (set --journal FILE, or --no-journal)",
            dir.display()
        ))
    })?;
    Ok(dir.join("journal.sqlite"))
}

/// A thread that hands `first` (the demo's showcase), then the lines of `stdin`, if
/// any, to the console; then `Input::End`. The channel is bounded:
/// the reader waits while the console is behind.
fn read_lines(first: Vec<Input>, stdin: Option<std::io::Stdin>) -> Receiver<Input> {
    let (tx, rx) = bounded(1024);
    std::thread::spawn(move || {
        for input in first {
            if tx.send(input).is_err() {
                return;
            }
        }
        if let Some(stdin) = stdin {
            let mut stdin = stdin.lock();
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match stdin.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        if tx.send(Input::Line { text, echo: false }).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        let _ = tx.send(Input::End);
    });
    rx
}

/// On a terminal, a line on stderr every few seconds while jobs are queued or running.
fn show_progress(manager: Arc<Manager>) {
    std::thread::spawn(move || {
        let mut last = String::new();
        loop {
            std::thread::sleep(Duration::from_secs(3));
            let s = manager.stats();
            if s.jobs_queued + s.jobs_running == 0 {
                continue;
            }
            let line = format!(
                "progress: {} queued, {} running, {} done",
                s.jobs_queued,
                s.jobs_running,
                s.jobs_ended()
            );
            if line != last {
                eprintln!("{line}");
                last = line;
            }
        }
    });
}

/// Blocks SIGINT and SIGTERM in this thread and every thread it starts from now on, so
/// that one thread can take them with `sigwait` (children get a clean mask from std).
fn block_signals() -> libc::sigset_t {
    // SAFETY: the set is a local that sigemptyset initialises before use, and the
    // pointers passed are to it and to locals that outlive the calls.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is an initialised signal set and `sig` a live local for the answer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        n => format!("signal {n}"),
    }
}

fn run_worker(a: WorkerArgs) -> Result<(), Failure> {
    let (host, port) = (a.pool.host.clone(), a.pool.port);
    let mut config = if a.insecure_plaintext {
        WorkerConfig::insecure_plaintext(host.clone(), port)
    } else {
        let why = " (or --insecure-plaintext)";
        let trust = a.pool.trust()?;
        let cert = a
            .security_worker_certificate
            .ok_or_else(|| usage(format!("--security-worker-certificate is required{why}")))?;
        let key = a
            .security_worker_key
            .ok_or_else(|| usage(format!("--security-worker-key is required{why}")))?;
        let identity = Identity::from_pem_files(cert, key).map_err(failed)?;
        let c = WorkerConfig::new(host.clone(), port, identity, trust);
        if a.no_verify_hostname {
            c.no_verify_hostname()
        } else {
            c
        }
    };
    if let Some(name) = a.name {
        config.name = name;
    }
    for tag in a.tag {
        config = config.tag(tag);
    }
    config.slots = a.slots;
    config.ahead = a.ahead;
    if let Some(user) = a.job_user {
        config = config.job_user(user);
    }
    let signals = block_signals();
    let worker = Worker::start(config).map_err(failed)?;
    eprintln!(
        "workpool worker {} started; connecting to {host}:{port}",
        worker.name()
    );
    // First SIGTERM/SIGINT: drain (no new jobs; leave when the running ones end).
    // A second one: stop now, killing what still runs.
    let sig = wait_signal(&signals);
    log::info!("signal {sig}: draining; send it again to stop at once");
    worker.drain(None);
    let worker = Arc::new(worker);
    let w = worker.clone();
    std::thread::spawn(move || {
        let sig = wait_signal(&signals);
        log::info!("signal {sig}: stopping now");
        w.stop();
    });
    while !worker.wait(Duration::from_secs(3600)) {}
    Ok(())
}

/// Whom a generated client certificate is for, and its name.
enum ClientCert {
    Worker(String),
    Submitter(String),
}

fn generate(a: GenerateArgs) -> Result<(), Failure> {
    let (n, host, dir, days, force) = (
        a.number_of_workers,
        a.hostname.as_str(),
        a.output_dir,
        a.days,
        a.force,
    );
    if days == 0 {
        return Err(usage("--days must be at least 1"));
    }
    // (certificate file, key file, the name the certificate is for; none: the manager's)
    let mut files = vec![(
        "host-cert.pem".to_string(),
        "host-key.pem".to_string(),
        None,
    )];
    files.extend((0..n).map(|i| {
        (
            format!("worker-{i}-cert.pem"),
            format!("worker-{i}-key.pem"),
            Some(ClientCert::Worker(format!("worker-{i}"))),
        )
    }));
    files.extend((1..=a.number_of_submitters).map(|k| {
        (
            format!("submitter-{k}-cert.pem"),
            format!("submitter-{k}-key.pem"),
            Some(ClientCert::Submitter(format!("submitter-{k}"))),
        )
    }));
    if !force {
        let existing: Vec<String> = files
            .iter()
            .flat_map(|(c, k, _)| [c, k])
            .map(|f| dir.join(f))
            .filter(|p| p.symlink_metadata().is_ok())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            return Err(failed(format!(
                "{} exist(s) already; nothing was written (--force replaces them)",
                existing.join(", ")
            )));
        }
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| failed(format!("creating {}: {e}", dir.display())))?;
    let mut names = vec![host];
    for extra in ["localhost", "127.0.0.1"] {
        if !names.contains(&extra) {
            names.push(extra);
        }
    }
    for (cert_file, key_file, role) in &files {
        let generated = match role {
            None => generate_manager_certificate(&names, days),
            Some(ClientCert::Worker(name)) => {
                generate_worker_certificate(&[name, "localhost", "127.0.0.1"], days)
            }
            Some(ClientCert::Submitter(name)) => {
                generate_submitter_certificate(&[name, "localhost", "127.0.0.1"], days)
            }
        }
        .map_err(failed)?;
        let (cert_path, key_path) = (dir.join(cert_file), dir.join(key_file));
        generated
            .write_pem_files(&cert_path, &key_path, force)
            .map_err(failed)?;
        println!("wrote {}", cert_path.display());
        println!("wrote {}", key_path.display());
    }
    Ok(())
}

const SHOWCASE: &[&str] = &[
    "echo streaming, one line at a time:; for i in 1 2 3 4; do echo \"  tick $i\"; sleep 0.25; done",
    ":tags big",
    "echo this job needed the tag big and ran on $(hostname) as job $WORKPOOL_JOB_ID",
    ":tags",
    "sleep 0.4; echo queued job A done",
    "sleep 0.4; echo queued job B done",
    "sleep 0.4; echo queued job C done",
    "echo this one fails >&2; exit 3",
    ":workers",
];

fn demo(a: DemoArgs) -> Result<ExitCode, Failure> {
    let days = DEFAULT_VALIDITY_DAYS;
    let host = generate_manager_certificate(&["localhost", "127.0.0.1"], days).map_err(failed)?;
    let worker_certs: Vec<_> = ["alpha", "beta"]
        .iter()
        .map(|n| generate_worker_certificate(&[n], days))
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    let mut roots = PeerTrust::new();
    for c in &worker_certs {
        roots
            .add_pinned_pem(c.cert_pem.as_bytes())
            .map_err(failed)?;
    }
    let identity =
        Identity::from_pem(host.cert_pem.as_bytes(), host.key_pem.as_bytes()).map_err(failed)?;
    let manager = Arc::new(
        Manager::bind(ManagerConfig::new("127.0.0.1:0", identity, roots)).map_err(failed)?,
    );
    let joined = manager.subscribe();
    let port = manager.local_addr().port();
    let mut workers = Vec::new();
    for (i, (name, c)) in ["alpha", "beta"].iter().zip(&worker_certs).enumerate() {
        let identity =
            Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).map_err(failed)?;
        let roots = PeerTrust::pinned_pem(host.cert_pem.as_bytes()).map_err(failed)?;
        let mut config = WorkerConfig::new("127.0.0.1", port, identity, roots).name(*name);
        if i == 1 {
            config = config.tag("big");
        }
        workers.push(Worker::start(config).map_err(failed)?);
    }
    let mut seen = 0;
    while seen < workers.len() {
        match joined.recv_timeout(Duration::from_secs(30)) {
            Ok(ManagerEvent::WorkerJoined(_)) => seen += 1,
            Ok(_) => {}
            Err(_) => return Err(failed("the demo workers did not join within 30 s")),
        }
    }
    if !a.json {
        eprintln!(
            "demo: manager on {} with workers alpha (1 slot) and beta (1 slot, tag big), mutual TLS\n",
            manager.local_addr()
        );
    }
    let m = manager.clone();
    // The workers leave before the manager shuts down, so that they do not try to
    // reconnect to it.
    let shutdown = Box::new(move || {
        for w in &workers {
            w.stop();
        }
        m.shutdown();
    });
    let console = Console::new(manager, a.json, shutdown);
    let mut lines: Vec<Input> = SHOWCASE
        .iter()
        .map(|s| Input::Line {
            text: s.to_string(),
            echo: true,
        })
        .collect();
    let stdin = if a.interactive {
        lines.push(Input::Say(
            "demo: now reading jobs from stdin (`exit` to quit, `:help` for directives)".into(),
        ));
        Some(std::io::stdin())
    } else {
        None
    };
    console.run(Some(read_lines(lines, stdin)), None);
    Ok(ExitCode::SUCCESS)
}

/// What the console's loop takes from its reader thread.
enum Input {
    /// A line to act on; `echo` shows it first (the demo's showcase).
    Line { text: String, echo: bool },
    /// A line to show (human output only).
    Say(String),
    /// No more lines.
    End,
}

/// Why the console stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    EndOfInput,
    Exit,
    Signal(i32),
}

impl Stop {
    fn name(self) -> &'static str {
        match self {
            Stop::EndOfInput => "end_of_input",
            Stop::Exit => "exit",
            Stop::Signal(_) => "signal",
        }
    }

    fn signal(self) -> Option<i32> {
        match self {
            Stop::Signal(s) => Some(s),
            _ => None,
        }
    }

    fn describe(self) -> String {
        match self {
            Stop::EndOfInput => "end of input".into(),
            Stop::Exit => "exit".into(),
            Stop::Signal(s) => signal_name(s),
        }
    }
}

/// What a console line asks for.
#[derive(Debug, PartialEq, Eq)]
enum LineKind<'a> {
    Nothing,
    Exit,
    Directive(&'a str),
    Job(&'a str),
}

/// Reads one console line: blank, `exit` in any letter case, `:directive`, or a job
/// (`::` at the start stands for a script that begins with `:`).
fn classify(line: &str) -> LineKind<'_> {
    let line = line.trim();
    if line.is_empty() {
        LineKind::Nothing
    } else if line.eq_ignore_ascii_case("exit") {
        LineKind::Exit
    } else if line.starts_with("::") {
        LineKind::Job(&line[1..])
    } else if let Some(d) = line.strip_prefix(':') {
        LineKind::Directive(d)
    } else {
        LineKind::Job(line)
    }
}

/// One JSON line of the console's output.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event<'a> {
    Listening {
        address: String,
    },
    WorkerJoined {
        worker: &'a str,
        tags: &'a BTreeSet<String>,
        platform: &'a str,
        slots: u32,
    },
    WorkerLeft {
        worker: &'a str,
        reason: &'a str,
    },
    Submitted {
        job: u64,
        command: &'a str,
    },
    Started {
        job: u64,
        worker: &'a str,
    },
    Output {
        job: u64,
        stream: &'static str,
        data: &'a str,
    },
    Requeued {
        job: u64,
        attempt: u32,
    },
    Warning {
        job: u64,
        message: &'a str,
    },
    Finished {
        job: u64,
        outcome: &'static str,
        exit_code: Option<i32>,
        worker: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    Error {
        message: &'a str,
    },
    Status {
        workers: usize,
        workers_draining: usize,
        slots: usize,
        slots_busy: usize,
        queued: usize,
        running: usize,
        submitted: u64,
        finished: serde_json::Map<String, serde_json::Value>,
        oldest_queued_wait_seconds: Option<f64>,
        output_bytes: u64,
    },
    Jobs {
        jobs: Vec<JobLine<'a>>,
    },
    Workers {
        workers: Vec<WorkerLine<'a>>,
    },
    ShuttingDown {
        reason: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
    ShutDown {
        reason: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
    Summary {
        jobs: u64,
        outcomes: serde_json::Map<String, serde_json::Value>,
        failed: u64,
    },
}

#[derive(Serialize)]
struct JobLine<'a> {
    job: u64,
    state: &'static str,
    worker: Option<&'a str>,
    since_seconds: f64,
    attempt: u32,
    priority: i32,
    output_paused: bool,
    command: &'a str,
}

#[derive(Serialize)]
struct WorkerLine<'a> {
    worker: &'a str,
    address: Option<String>,
    tags: &'a BTreeSet<String>,
    platform: &'a str,
    slots: u32,
    running: usize,
}

/// Seconds, rounded to the millisecond.
fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e3).round() / 1e3
}

/// Where the console writes: buffered stdout and stderr, flushed when it is idle.
struct Out {
    json: bool,
    stdout: BufWriter<std::io::Stdout>,
    stderr: BufWriter<std::io::Stderr>,
}

impl Out {
    fn new(json: bool) -> Out {
        Out {
            json,
            stdout: BufWriter::with_capacity(OUT_BUFFER, std::io::stdout()),
            stderr: BufWriter::with_capacity(OUT_BUFFER, std::io::stderr()),
        }
    }

    /// One JSON line on stdout. Write errors (a closed stdout) are ignored, as the jobs
    /// go on whoever reads.
    fn event(&mut self, event: &Event) {
        let _ = serde_json::to_writer(&mut self.stdout, event);
        let _ = self.stdout.write_all(b"\n");
    }

    fn say(&mut self, text: &str) {
        let _ = writeln!(self.stdout, "{text}");
    }

    fn say_err(&mut self, text: &str) {
        let _ = writeln!(self.stderr, "{text}");
    }

    fn complain(&mut self, text: &str) {
        if self.json {
            self.event(&Event::Error { message: text });
        } else {
            self.say_err(&format!("workpool: {text}"));
        }
    }

    fn flush(&mut self) {
        let _ = self.stdout.flush();
        let _ = self.stderr.flush();
    }
}

/// Cuts one stream of a job into lines for human output, in time linear in the bytes:
/// each byte is looked at once, and copied at most once (into the held-back part of a
/// line). A line longer than the limit ([`MAX_LINE`]) is given out in pieces of at most
/// that many bytes, wherever its chunks began and ended (cut before a UTF-8 character
/// that would straddle the cut, when that character came in one chunk).
#[derive(Default)]
struct LineCutter {
    partial: Vec<u8>,
    limit: usize,
}

impl LineCutter {
    fn new(limit: usize) -> LineCutter {
        LineCutter {
            partial: Vec::new(),
            limit,
        }
    }

    /// Takes bytes; calls `line(head, tail)` for each line or piece, whose bytes are
    /// `head` then `tail` (without the newline).
    fn push(&mut self, mut bytes: &[u8], mut line: impl FnMut(&[u8], &[u8])) {
        loop {
            let newline = bytes.iter().position(|&b| b == b'\n');
            let mut text = &bytes[..newline.unwrap_or(bytes.len())];
            // The line so far is longer than the limit: give it out in pieces.
            while self.partial.len() + text.len() > self.limit {
                let cut = char_cut(text, self.limit - self.partial.len());
                line(&self.partial, &text[..cut]);
                self.partial.clear();
                text = &text[cut..];
            }
            match newline {
                Some(end) => {
                    line(&self.partial, text);
                    self.partial.clear();
                    bytes = &bytes[end + 1..];
                }
                None => {
                    self.partial.extend_from_slice(text);
                    return;
                }
            }
        }
    }

    /// Gives out what is held back (the job ended without a last newline).
    fn finish(&mut self, mut line: impl FnMut(&[u8], &[u8])) {
        if !self.partial.is_empty() {
            line(&self.partial, &[]);
        }
        self.partial = Vec::new();
    }
}

/// Where to cut `bytes` (longer than `at`) at or a little before `at`, so that a UTF-8
/// character is not split: up to 3 bytes earlier; `at` itself when that does not help
/// (not UTF-8) or would leave nothing before the cut (`at` is 0 only when what is held
/// back fills a piece already).
fn char_cut(bytes: &[u8], at: usize) -> usize {
    let continuation = |b: u8| b & 0xC0 == 0x80;
    let mut c = at;
    while c > 1 && c + 3 > at && continuation(bytes[c]) {
        c -= 1;
    }
    if continuation(bytes[c]) || c == 0 {
        at
    } else {
        c
    }
}

/// How many bytes at the end of `bytes` begin a UTF-8 character that the next chunk
/// completes (0 to 3).
fn incomplete_utf8_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let len = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if len > back { back } else { 0 };
    }
    0
}

/// Text for one stream of a job's JSON output: each chunk as UTF-8 (invalid bytes become
/// U+FFFD), a character split between two chunks kept whole.
#[derive(Default)]
struct Utf8Joiner {
    carry: Vec<u8>,
}

impl Utf8Joiner {
    /// The text of `bytes`, with what the previous chunk left; holds back an incomplete
    /// last character (at most 3 bytes).
    fn push(&mut self, bytes: &[u8], text: impl FnOnce(&str)) {
        let joined;
        let all: &[u8] = if self.carry.is_empty() {
            bytes
        } else {
            self.carry.extend_from_slice(bytes);
            joined = std::mem::take(&mut self.carry);
            &joined
        };
        let keep = incomplete_utf8_tail(all);
        let (now, later) = all.split_at(all.len() - keep);
        if !now.is_empty() {
            text(&String::from_utf8_lossy(now));
        }
        self.carry = later.to_vec();
    }

    fn finish(&mut self, text: impl FnOnce(&str)) {
        if !self.carry.is_empty() {
            text(&String::from_utf8_lossy(&std::mem::take(&mut self.carry)));
        }
    }
}

/// A job the console follows.
struct LiveJob {
    handle: Handle,
    /// What its lines are prefixed with: its id, or its index in an array.
    label: u64,
    worker: Option<String>,
    /// How it ended, once it has.
    outcome: Option<Outcome>,
    /// Human output: stdout's and stderr's lines; JSON: their text.
    lines: [LineCutter; 2],
    text: [Utf8Joiner; 2],
}

impl LiveJob {
    fn new(handle: Handle, label: u64) -> LiveJob {
        LiveJob {
            handle,
            label,
            worker: None,
            outcome: None,
            lines: [LineCutter::new(MAX_LINE), LineCutter::new(MAX_LINE)],
            text: Default::default(),
        }
    }

    fn id(&self) -> u64 {
        self.label
    }

    /// Prints one event; true when it was the job's last.
    fn print(&mut self, out: &mut Out, ev: JobEvent) -> bool {
        let id = self.id();
        match ev {
            JobEvent::Started { worker } => {
                if out.json {
                    out.event(&Event::Started {
                        job: id,
                        worker: &worker,
                    });
                }
                self.worker = Some(worker);
            }
            JobEvent::Output { stream, bytes } => self.output(out, stream, &bytes),
            JobEvent::Requeued { attempt } => {
                if out.json {
                    out.event(&Event::Requeued { job: id, attempt });
                } else {
                    out.say(&format!(
                        "[{id}] worker lost; queued again (attempt {attempt})"
                    ));
                }
            }
            JobEvent::Warning(w) => {
                if out.json {
                    out.event(&Event::Warning {
                        job: id,
                        message: &w,
                    });
                } else {
                    out.say_err(&format!("[{id}] warning: {w}"));
                }
            }
            JobEvent::Finished(outcome) => {
                self.finish(out, &outcome);
                self.outcome = Some(outcome);
                return true;
            }
            _ => {}
        }
        false
    }

    fn output(&mut self, out: &mut Out, stream: Stream, bytes: &[u8]) {
        self.print_stream(out, stream, Some(bytes));
    }

    /// Prints a stream's bytes as they come (`Some`), or what is left of it at its end
    /// (`None`): JSON events, or prefixed lines.
    fn print_stream(&mut self, out: &mut Out, stream: Stream, bytes: Option<&[u8]>) {
        let id = self.id();
        let i = stream as usize;
        if out.json {
            let emit = |data: &str| {
                out.event(&Event::Output {
                    job: id,
                    stream: stream.name(),
                    data,
                })
            };
            match bytes {
                Some(bytes) => self.text[i].push(bytes, emit),
                None => self.text[i].finish(emit),
            }
        } else {
            let prefix = prefix(id, stream);
            let w: &mut dyn Write = match stream {
                Stream::Stdout => &mut out.stdout,
                Stream::Stderr => &mut out.stderr,
            };
            let line = |head: &[u8], tail: &[u8]| write_line(w, &prefix, head, tail);
            match bytes {
                Some(bytes) => self.lines[i].push(bytes, line),
                None => self.lines[i].finish(line),
            }
        }
    }

    fn finish(&mut self, out: &mut Out, outcome: &Outcome) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            self.print_stream(out, stream, None);
        }
        let id = self.id();
        if out.json {
            let (signal, reason) = match outcome {
                Outcome::Signaled(s) => (Some(*s), None),
                Outcome::Rejected(r) | Outcome::SpawnFailed(r) => (None, Some(r.as_str())),
                _ => (None, None),
            };
            out.event(&Event::Finished {
                job: id,
                outcome: outcome.name(),
                exit_code: outcome.exit_code(),
                worker: self.worker.as_deref(),
                signal,
                reason,
            });
        } else {
            out.say(&match outcome {
                Outcome::Exited(code) => format!("[{id}] Exit code      : {code}"),
                other => format!("[{id}] Ended          : {other}"),
            });
        }
    }
}

/// Prints up to [`BURST`] of a job's events (up to `Started`, if `until_started`);
/// whether there were any, and whether the job ended.
fn take_events(job: &mut LiveJob, out: &mut Out, until_started: bool) -> (bool, bool) {
    let mut any = false;
    for _ in 0..BURST {
        match job.handle.events().try_recv() {
            Ok(ev) => {
                any = true;
                let started = matches!(ev, JobEvent::Started { .. });
                if job.print(out, ev) {
                    return (true, true);
                }
                if started && until_started {
                    break;
                }
            }
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => {
                // Only if the manager went away under the job.
                let outcome = Outcome::Rejected("the manager shut down".into());
                job.finish(out, &outcome);
                job.outcome = Some(outcome);
                return (true, true);
            }
        }
    }
    (any, false)
}

fn prefix(id: u64, stream: Stream) -> String {
    match stream {
        Stream::Stdout => format!("[{id}] Standard Output: "),
        Stream::Stderr => format!("[{id}] Standard Error : "),
    }
}

fn write_line(w: &mut dyn Write, prefix: &str, head: &[u8], tail: &[u8]) {
    let _ = w.write_all(prefix.as_bytes());
    let _ = w.write_all(head);
    let _ = w.write_all(tail);
    let _ = w.write_all(b"\n");
}

/// Reads job lines and directives, submits jobs, and prints what happens: one loop on
/// one thread (see the file's doc).
struct Console {
    pool: Pool,
    out: Out,
    /// What the directives set for the jobs that follow: requirements, timeout, env, ...
    template: JobSpec,
    /// The jobs that have started (their output comes now), in no order.
    started: Vec<LiveJob>,
    /// The jobs that have not, oldest first (see [`WATCHED_QUEUED`]).
    queued: VecDeque<Box<LiveJob>>,
    /// When the queued jobs beyond the watched ones are looked at next, and where.
    next_poll: Instant,
    poll_cursor: usize,
    pool_events: Option<Receiver<ManagerEvent>>,
    /// Workers announced from the snapshot taken when the console started; their
    /// `WorkerJoined`, if it comes after, is not printed twice.
    announced: HashSet<u64>,
    /// Shuts the manager down (on a thread of its own, while the loop goes on printing).
    shutdown: Option<Box<dyn FnOnce() + Send>>,
    /// The manager's journal, if it keeps one: shutting down then ends no job.
    journal: Option<PathBuf>,
    /// The jobs that ended, by outcome name, and how many did not succeed.
    ended: std::collections::BTreeMap<&'static str, u64>,
    failed: u64,
    /// The outcome of the job that ended last.
    last: Option<Outcome>,
}

impl Console {
    /// A manager's console: subscribes to the pool's events, then announces the workers
    /// that are connected already (those that joined between the manager's start and
    /// the subscription).
    fn new(manager: Arc<Manager>, json: bool, shutdown: Box<dyn FnOnce() + Send>) -> Console {
        let mut out = Out::new(json);
        if json {
            out.event(&Event::Listening {
                address: manager.local_addr().to_string(),
            });
        }
        // The subscription first, then the snapshot: a worker that joins in between is
        // in both, and printed once.
        let pool = manager.subscribe();
        let mut announced = HashSet::new();
        for w in manager.workers() {
            print_joined(&mut out, &w);
            announced.insert(w.id);
        }
        out.flush();
        let mut console = Console::with(Pool::Local(manager), out);
        console.pool_events = Some(pool);
        console.announced = announced;
        console.shutdown = Some(shutdown);
        console
    }

    /// A console with nothing going on yet.
    fn with(pool: Pool, out: Out) -> Console {
        Console {
            pool,
            out,
            template: JobSpec::new(""),
            started: Vec::new(),
            queued: VecDeque::new(),
            next_poll: Instant::now(),
            poll_cursor: 0,
            pool_events: None,
            announced: HashSet::new(),
            shutdown: None,
            journal: None,
            ended: Default::default(),
            failed: 0,
            last: None,
        }
    }

    /// Runs until the input ends (then every job has ended), `exit`, or a signal; shuts
    /// the manager down, prints the last line and says why it stopped.
    fn run(self, input: Option<Receiver<Input>>, signals: Option<Receiver<i32>>) -> Stop {
        self.run_inner(input, signals).0
    }

    /// Runs a remote pool's console (see [`Console::run`]): when its input ends, it
    /// waits for its jobs; a signal cancels them. Prints a summary of the outcomes.
    fn run_remote(
        self,
        input: Option<Receiver<Input>>,
        signals: Receiver<i32>,
    ) -> (Stop, remote::Summary) {
        self.run_inner(input, Some(signals))
    }

    fn run_inner(
        mut self,
        mut input: Option<Receiver<Input>>,
        signals: Option<Receiver<i32>>,
    ) -> (Stop, remote::Summary) {
        let mut stop: Option<Stop> = None;
        let mut done: Option<Receiver<()>> = None;
        let mut shut = false;
        loop {
            // Everything that is ready, until nothing is.
            loop {
                let mut busy = false;
                if let Some(sig) = signals.as_ref().and_then(|s| s.try_recv().ok()) {
                    busy = true;
                    if done.is_some() {
                        // A second signal while shutting down: stop now.
                        self.out.flush();
                        std::process::exit(128 + sig);
                    }
                    stop = Some(Stop::Signal(sig));
                    input = None;
                    done = Some(self.begin_shutdown(Stop::Signal(sig)));
                }
                busy |= self.take_pool_events();
                busy |= self.take_job_events();
                if let Some(rx) = &input {
                    for _ in 0..BURST {
                        let line = match rx.try_recv() {
                            Ok(Input::Line { text, echo }) => {
                                if echo && !self.out.json {
                                    self.out.say(&format!("> {text}"));
                                }
                                text
                            }
                            Ok(Input::Say(text)) => {
                                if !self.out.json {
                                    self.out.say(&text);
                                }
                                busy = true;
                                continue;
                            }
                            Err(TryRecvError::Empty) => break,
                            Ok(Input::End) | Err(TryRecvError::Disconnected) => {
                                stop = Some(Stop::EndOfInput);
                                input = None;
                                busy = true;
                                break;
                            }
                        };
                        busy = true;
                        if !self.line(&line) {
                            stop = Some(Stop::Exit);
                            input = None;
                            done = Some(self.begin_shutdown(Stop::Exit));
                            break;
                        }
                    }
                }
                if stop == Some(Stop::EndOfInput) && done.is_none() && self.no_jobs() {
                    done = Some(self.begin_shutdown(Stop::EndOfInput));
                    busy = true;
                }
                if let Some(d) = &done
                    && !shut
                    && !matches!(d.try_recv(), Err(TryRecvError::Empty))
                {
                    shut = true;
                    busy = true;
                }
                if !busy {
                    break;
                }
            }
            if shut && self.no_jobs() {
                break;
            }
            self.out.flush();
            // Wait for anything to be ready (it is taken on the next turn).
            let mut sel = Select::new();
            let mut any = false;
            let watched = self.watched_queued();
            if let Some(rx) = &input {
                sel.recv(rx);
                any = true;
            }
            if let Some(rx) = &signals {
                sel.recv(rx);
                any = true;
            }
            if let Some(rx) = &self.pool_events {
                sel.recv(rx);
                any = true;
            }
            if let Some(rx) = done.as_ref().filter(|_| !shut) {
                sel.recv(rx);
                any = true;
            }
            let queued = self.queued.iter().take(watched).map(|j| &**j);
            for j in self.started.iter().chain(queued) {
                sel.recv(j.handle.events());
                any = true;
            }
            if self.queued.len() > watched {
                let _ = sel.ready_deadline(self.next_poll);
            } else if any {
                sel.ready();
            } else {
                break;
            }
        }
        self.take_pool_events();
        let stop = stop.unwrap_or(Stop::EndOfInput);
        let summary = remote::Summary {
            failed: self.failed,
            last: self.last.take(),
        };
        if self.pool.is_remote() {
            self.summarize();
            self.out.flush();
            return (stop, summary);
        }
        if self.out.json {
            self.out.event(&Event::ShutDown {
                reason: stop.name(),
                signal: stop.signal(),
            });
        } else {
            self.out.say_err(&format!(
                "workpool manager: shut down ({})",
                stop.describe()
            ));
        }
        self.out.flush();
        (stop, summary)
    }

    /// A remote console's last line: how many jobs ended how (when there was more than
    /// one, or one did not succeed).
    fn summarize(&mut self) {
        let total: u64 = self.ended.values().sum();
        if self.out.json {
            let outcomes = self
                .ended
                .iter()
                .map(|(n, c)| (n.to_string(), (*c).into()))
                .collect();
            self.out.event(&Event::Summary {
                jobs: total,
                outcomes,
                failed: self.failed,
            });
        } else if total > 1 || self.failed > 0 {
            let counts: Vec<String> = self.ended.iter().map(|(n, c)| format!("{c} {n}")).collect();
            self.out.say_err(&format!(
                "workpool: {total} job(s): {}; {} did not succeed",
                if counts.is_empty() {
                    "none ended".to_string()
                } else {
                    counts.join(", ")
                },
                self.failed
            ));
        }
    }

    /// Starts the manager's shutdown on a thread of its own; the receiver hears when it
    /// is done.
    fn begin_shutdown(&mut self, why: Stop) -> Receiver<()> {
        if self.pool.is_remote() {
            // Nothing shuts down: the jobs end, and the summary follows.
        } else if self.out.json {
            self.out.event(&Event::ShuttingDown {
                reason: why.name(),
                signal: why.signal(),
            });
        } else if why != Stop::EndOfInput {
            let what = match &self.journal {
                Some(path) => format!(
                    "no job ends: queued and running jobs are kept in the journal {} and go on when the manager starts again on it",
                    path.display()
                ),
                None => "queued jobs are rejected, running ones may finish".to_owned(),
            };
            self.out.say_err(&format!(
                "workpool manager: shutting down ({}): {what}",
                why.describe()
            ));
        }
        if self.pool.is_remote() && matches!(why, Stop::Signal(_)) {
            let live: Vec<JobId> = self
                .started
                .iter()
                .chain(self.queued.iter().map(|j| &**j))
                .map(|j| j.handle.id())
                .collect();
            if !self.out.json {
                self.out.say_err(&format!(
                    "workpool: {}: cancelling {} job(s)",
                    signal_name(why.signal().unwrap_or(0)),
                    live.len()
                ));
            }
            self.pool.cancel_all(live);
        }
        let (tx, rx) = bounded(1);
        let shutdown = self.shutdown.take();
        std::thread::spawn(move || {
            if let Some(f) = shutdown {
                f();
            }
            let _ = tx.send(());
        });
        rx
    }

    /// Prints the pool's events that are ready; whether there were any.
    fn take_pool_events(&mut self) -> bool {
        let Some(pool) = &self.pool_events else {
            return false;
        };
        let mut any = false;
        loop {
            match pool.try_recv() {
                Ok(ev) => {
                    any = true;
                    match &ev {
                        // Announced from the snapshot already.
                        ManagerEvent::WorkerJoined(w) if self.announced.remove(&w.id) => {}
                        ManagerEvent::WorkerJoined(w) => print_joined(&mut self.out, w),
                        ManagerEvent::WorkerLeft { name, reason, .. } => {
                            if self.out.json {
                                self.out.event(&Event::WorkerLeft {
                                    worker: name,
                                    reason,
                                });
                            } else {
                                self.out.say(&format!("worker {name} left: {reason}"));
                            }
                        }
                        _ => {}
                    }
                }
                Err(TryRecvError::Empty) => return any,
                Err(TryRecvError::Disconnected) => {
                    self.pool_events = None;
                    return true;
                }
            }
        }
    }

    /// How many queued jobs, oldest first, the console waits on (see [`WATCHED_QUEUED`]).
    fn watched_queued(&self) -> usize {
        WATCHED_QUEUED.max(self.started.len())
    }

    fn no_jobs(&self) -> bool {
        self.started.is_empty() && self.queued.is_empty()
    }

    /// Prints the jobs' events that are ready (up to [`BURST`] per job): those of the
    /// started jobs and of the watched queued ones, and of every queued one when it is
    /// time to look at them; moves the jobs that start, forgets those that ended;
    /// whether there were any.
    fn take_job_events(&mut self) -> bool {
        let mut any = false;
        let mut i = 0;
        while i < self.started.len() {
            let (events, ended) = take_events(&mut self.started[i], &mut self.out, false);
            any |= events;
            if ended {
                let job = self.started.swap_remove(i);
                self.tally(&job);
            } else {
                i += 1;
            }
        }
        let watched = self.watched_queued();
        let mut i = 0;
        while i < watched.min(self.queued.len()) {
            if !self.take_queued(i, &mut any) {
                i += 1;
            }
        }
        // The others, a batch at a time, when it is time.
        let others = self.queued.len().saturating_sub(watched);
        if others > 0 && Instant::now() >= self.next_poll {
            self.next_poll = Instant::now() + QUEUED_POLL;
            let mut i = self.poll_cursor.max(watched);
            for _ in 0..others.min(QUEUED_POLL_BATCH) {
                if i >= self.queued.len() {
                    i = watched;
                }
                if !self.take_queued(i, &mut any) {
                    i += 1;
                }
            }
            self.poll_cursor = i;
        }
        any
    }

    /// Prints the events of the queued job at `i`; moves it to the started ones if it
    /// started, forgets it if it ended; whether it left the queue.
    fn take_queued(&mut self, i: usize, any: &mut bool) -> bool {
        let (events, ended) = take_events(&mut self.queued[i], &mut self.out, true);
        *any |= events;
        if !ended && self.queued[i].worker.is_none() {
            return false;
        }
        let job = self.queued.remove(i).expect("in range");
        if ended {
            self.tally(&job);
        } else {
            self.started.push(*job);
        }
        true
    }

    /// Counts how a job ended.
    fn tally(&mut self, job: &LiveJob) {
        if let Some(o) = &job.outcome {
            *self.ended.entry(o.name()).or_default() += 1;
            if !o.success() {
                self.failed += 1;
            }
            self.last = Some(o.clone());
        }
    }

    /// Follows a job without announcing it (one attached to).
    fn follow_quietly(&mut self, handle: Handle, label: u64) {
        self.queued.push_back(Box::new(LiveJob::new(handle, label)));
    }

    /// Follows a job submitted elsewhere (an array's), printed as `label`.
    fn follow(&mut self, handle: Handle, label: u64, command: &str) {
        if self.out.json {
            self.out.event(&Event::Submitted {
                job: handle.id().0,
                command,
            });
        }
        self.queued.push_back(Box::new(LiveJob::new(handle, label)));
    }

    /// Handles one line; false means `exit`.
    fn line(&mut self, line: &str) -> bool {
        match classify(line) {
            LineKind::Nothing => {}
            LineKind::Exit => return false,
            LineKind::Directive(d) => self.directive(d),
            LineKind::Job(script) => self.submit(script),
        }
        true
    }

    fn submit(&mut self, script: &str) {
        let spec = JobSpec {
            script: script.to_string(),
            ..self.template.clone()
        };
        match self.pool.submit(spec) {
            Ok(handle) => {
                let label = handle.id().0;
                self.follow(handle, label, script);
            }
            Err(e) => {
                self.failed += 1;
                self.out.complain(&format!("job not submitted: {e}"));
            }
        }
    }

    fn status(&mut self) {
        let Some(s) = self.answer(self.pool.stats(), "read the status") else {
            return;
        };
        if self.out.json {
            let finished = s
                .jobs_finished
                .iter()
                .map(|(n, c)| (n.to_string(), (*c).into()))
                .collect();
            self.out.event(&Event::Status {
                workers: s.workers,
                workers_draining: s.workers_draining,
                slots: s.slots_total,
                slots_busy: s.slots_busy,
                queued: s.jobs_queued,
                running: s.jobs_running,
                submitted: s.jobs_submitted,
                finished,
                oldest_queued_wait_seconds: s.oldest_queued_wait.map(seconds),
                output_bytes: s.output_bytes,
            });
            return;
        }
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                format!("{:.3} ms", d.as_secs_f64() * 1e3)
            })
        };
        let done: Vec<String> = s
            .jobs_finished
            .iter()
            .filter(|(_, c)| *c > 0)
            .map(|(n, c)| format!("{n} {c}"))
            .collect();
        let done = if done.is_empty() {
            String::new()
        } else {
            format!(" ({})", done.join(", "))
        };
        self.out.say(&format!(
            "status: {} worker(s) ({} draining), {}/{} slots busy, {} queued{}, {} running, {} done{}, {} bytes streamed",
            s.workers,
            s.workers_draining,
            s.slots_busy,
            s.slots_total,
            s.jobs_queued,
            s.oldest_queued_wait.map_or(String::new(), |d| format!(" (oldest {:.1} s)", d.as_secs_f64())),
            s.jobs_running,
            s.jobs_ended(),
            done,
            s.output_bytes
        ));
        self.out.say(&format!(
            "  queue wait p50 {} p99 {}; dispatch p50 {} p99 {}",
            ms(s.queue_wait.quantile(0.5)),
            ms(s.queue_wait.quantile(0.99)),
            ms(s.dispatch_latency.quantile(0.5)),
            ms(s.dispatch_latency.quantile(0.99))
        ));
        for w in &s.per_worker {
            self.out.say(&format!(
                "  worker {}: {} running, {} jobs, heard {:.1} s ago, connected {:.0} s",
                w.name,
                w.running,
                w.jobs_run,
                w.last_heard.as_secs_f64(),
                w.connected_for.as_secs_f64()
            ));
        }
    }

    /// What the pool answered, or `None` after saying why it could not (counted as a
    /// failure).
    fn answer<T>(&mut self, answer: workpool::Result<T>, what: &str) -> Option<T> {
        answer
            .inspect_err(|e| {
                self.failed += 1;
                self.out.complain(&format!("cannot {what}: {e}"));
            })
            .ok()
    }

    fn list_jobs(&mut self) {
        let Some(jobs) = self.answer(self.pool.jobs(), "list the jobs") else {
            return;
        };
        if self.out.json {
            let jobs = jobs
                .iter()
                .map(|j| {
                    let (state, worker) = match &j.state {
                        JobState::Running { worker } => ("running", Some(worker.as_str())),
                        JobState::Disconnected { worker } => {
                            ("disconnected", Some(worker.as_str()))
                        }
                        _ => ("queued", None),
                    };
                    JobLine {
                        job: j.id.0,
                        state,
                        worker,
                        since_seconds: seconds(j.since),
                        attempt: j.attempt,
                        priority: j.priority,
                        output_paused: j.output_paused,
                        command: &j.script,
                    }
                })
                .collect();
            self.out.event(&Event::Jobs { jobs });
        } else if jobs.is_empty() {
            self.out.say("no jobs queued or running");
        } else {
            for j in &jobs {
                let state = match &j.state {
                    JobState::Running { worker } if j.output_paused => {
                        format!("running on {worker} (output paused: the reader is behind)")
                    }
                    JobState::Running { worker } => format!("running on {worker}"),
                    JobState::Disconnected { worker } => {
                        format!("waiting for {worker} to reconnect")
                    }
                    _ => "queued".to_string(),
                };
                let script = if j.script.is_empty() {
                    "(not this certificate's job: its script is not shown)"
                } else {
                    &j.script
                };
                self.out.say(&format!(
                    "job {}: {state} for {:.1} s (attempt {}, priority {}): {script}",
                    j.id,
                    j.since.as_secs_f64(),
                    j.attempt,
                    j.priority,
                ));
            }
        }
    }

    fn list_workers(&mut self) {
        let Some(workers) = self.answer(self.pool.workers(), "list the workers") else {
            return;
        };
        if self.out.json {
            let workers = workers
                .iter()
                .map(|w| WorkerLine {
                    worker: &w.name,
                    address: w.address.map(|a| a.to_string()),
                    tags: &w.tags,
                    platform: &w.platform,
                    slots: w.slots,
                    running: w.running,
                })
                .collect();
            self.out.event(&Event::Workers { workers });
        } else if workers.is_empty() {
            self.out.say("no workers connected");
        } else {
            for w in &workers {
                self.out.say(&format!("worker {}: {}", w.name, describe(w)));
            }
        }
    }

    fn directive(&mut self, d: &str) {
        let (name, arg) = match d.split_once(char::is_whitespace) {
            Some((n, a)) => (n, a.trim()),
            None => (d, ""),
        };
        let t = &mut self.template;
        match name {
            "tags" => {
                t.requirements.tags = arg
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(String::from)
                    .collect();
            }
            "platform" => t.requirements.platform = (!arg.is_empty()).then(|| arg.to_string()),
            "timeout" if arg.is_empty() => t.timeout = None,
            "timeout" => match parse_duration(arg) {
                Ok(d) if !d.is_zero() => t.timeout = Some(d),
                Ok(_) => self.out.complain("a timeout must be more than zero"),
                Err(e) => self.out.complain(&e),
            },
            "env" if arg.is_empty() => t.env.clear(),
            "env" => match arg.split_once('=') {
                Some((k, v)) if !k.is_empty() && !k.starts_with("WORKPOOL_") => {
                    t.env.insert(k.to_string(), v.to_string());
                }
                _ => self
                    .out
                    .complain(&format!("expected :env NAME=VALUE, got {arg:?}")),
            },
            "priority" => match if arg.is_empty() { Ok(0) } else { arg.parse() } {
                Ok(p) => t.priority = p,
                Err(_) => self
                    .out
                    .complain(&format!("not a priority: {arg:?} (an integer)")),
            },
            "retries" => match if arg.is_empty() { Ok(0) } else { arg.parse() } {
                Ok(r) => t.retries = r,
                Err(_) => self.out.complain(&format!("not a retry count: {arg:?}")),
            },
            "cancel" => match arg.parse::<u64>() {
                Ok(id) => {
                    if let Err(e) = self.pool.cancel(JobId(id)) {
                        self.out.complain(&format!("cannot cancel job {id}: {e}"));
                    }
                }
                Err(_) => self
                    .out
                    .complain(&format!("expected :cancel JOB-ID, got {arg:?}")),
            },
            "jobs" => self.list_jobs(),
            "status" => self.status(),
            "workers" => self.list_workers(),
            "help" => self.out.say(CONSOLE_HELP),
            _ => self
                .out
                .complain(&format!("unknown directive :{name} (try :help)")),
        }
    }
}

fn print_joined(out: &mut Out, w: &WorkerInfo) {
    if out.json {
        out.event(&Event::WorkerJoined {
            worker: &w.name,
            tags: &w.tags,
            platform: &w.platform,
            slots: w.slots,
        });
    } else {
        out.say(&format!("worker {} joined ({})", w.name, describe(w)));
    }
}

fn describe(w: &WorkerInfo) -> String {
    let tags: Vec<&str> = w.tags.iter().map(String::as_str).collect();
    format!(
        "{}, {} slot(s), {} running, tags [{}], from {}",
        w.platform,
        w.slots,
        w.running,
        tags.join(","),
        w.address.map_or("?".into(), |a| a.to_string())
    )
}

/// A duration as humantime reads it (`30s`, `500ms`, `2m`, `1h`, `1m30s`), or a bare
/// number of seconds (`30`, `1.5`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(n).map_err(|_| format!("not a duration: {s:?}"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("not a duration: {s:?} ({e}; try 30s, 500ms, 2m, 1m30s)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` through a cutter of `limit`; returns the lines (pieces) given out.
    fn cut(limit: usize, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut c = LineCutter::new(limit);
        let mut lines = Vec::new();
        for chunk in chunks {
            c.push(chunk, |h, t| lines.push([h, t].concat()));
            assert!(c.partial.len() <= limit, "held back more than the limit");
        }
        c.finish(|h, t| lines.push([h, t].concat()));
        lines
    }

    #[test]
    fn lines_are_cut_at_newlines_whatever_the_chunks() {
        let want: Vec<Vec<u8>> = vec![b"one".to_vec(), b"two".to_vec(), b"".to_vec(), b"3".into()];
        assert_eq!(cut(100, &[b"one\ntwo\n\n3"]), want);
        assert_eq!(cut(100, &[b"on", b"e\ntw", b"o\n", b"\n", b"3"]), want);
        assert_eq!(cut(100, &[b"one\n", b"two\n\n3\n"]), want);
        assert!(cut(100, &[]).is_empty());
    }

    #[test]
    fn a_long_line_comes_out_in_pieces_of_the_limit_and_nothing_is_lost() {
        let data: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for chunk in [1, 7, 100, 4096, 10_000] {
            let chunks: Vec<&[u8]> = data.chunks(chunk).collect();
            let lines = cut(1000, &chunks);
            assert!(lines.iter().all(|l| l.len() <= 1000), "chunk {chunk}");
            assert_eq!(lines.concat(), data, "chunk {chunk}");
            assert_eq!(lines.len(), 10, "chunk {chunk}");
        }
        // A newline after pieces ends the line where it is.
        let lines = cut(4, &[b"abcdefghij\nk"]);
        assert_eq!(
            lines,
            vec![b"abcd".to_vec(), b"efgh".into(), b"ij".into(), b"k".into()]
        );
    }

    #[test]
    fn pieces_are_not_cut_inside_a_utf8_character() {
        let text = "é€😀x".repeat(500);
        for limit in [5, 6, 7, 64] {
            let lines = cut(limit, &[text.as_bytes()]);
            for l in &lines {
                assert!(std::str::from_utf8(l).is_ok(), "limit {limit}: {l:?}");
                assert!(l.len() <= limit);
            }
            assert_eq!(lines.concat(), text.as_bytes());
        }
        // Bytes that are not UTF-8 are cut at the limit.
        let junk = vec![0x80u8; 50];
        let lines = cut(8, &[&junk]);
        assert!(lines[..lines.len() - 1].iter().all(|l| l.len() == 8));
        assert_eq!(lines.concat(), junk);
    }

    #[test]
    fn json_text_keeps_characters_split_between_chunks_whole() {
        let text = "aé€😀\u{0}\"\\\n".repeat(20);
        let bytes = text.as_bytes();
        for chunk in 1..=7 {
            let mut j = Utf8Joiner::default();
            let mut got = String::new();
            for c in bytes.chunks(chunk) {
                j.push(c, |t| got.push_str(t));
                assert!(j.carry.len() <= 3);
            }
            j.finish(|t| got.push_str(t));
            assert_eq!(got, text, "chunk {chunk}");
        }
        // Bytes that are not UTF-8 become U+FFFD; an unfinished character at the end too.
        let mut j = Utf8Joiner::default();
        let mut got = String::new();
        j.push(b"a\xffb\xe2\x82", |t| got.push_str(t));
        j.finish(|t| got.push_str(t));
        assert_eq!(got, "a\u{fffd}b\u{fffd}");
    }

    #[test]
    fn console_lines() {
        assert_eq!(classify("  "), LineKind::Nothing);
        for exit in ["exit", "EXIT", "Exit", "  eXiT  "] {
            assert_eq!(classify(exit), LineKind::Exit, "{exit}");
        }
        assert_eq!(classify("exit 3"), LineKind::Job("exit 3"));
        assert_eq!(classify(":tags a,b"), LineKind::Directive("tags a,b"));
        assert_eq!(classify(":: > out.txt"), LineKind::Job(": > out.txt"));
        assert_eq!(classify(":::"), LineKind::Job("::"));
        assert_eq!(classify("echo :x"), LineKind::Job("echo :x"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
