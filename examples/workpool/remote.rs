//! The remote side of the CLI: `submit`, `attach`, `jobs`, `workers`, `status` and
//! `cancel` talk to a manager over the network as a submitter (a [`Client`]), and the
//! console runs on either kind of pool.

use super::terminal::{self, Plan, RawMode};
use super::{
    Console, Event, Failure, Input, Out, PoolArgs, Stop, block_signals, failed, number,
    parse_duration, read_lines, usage, wait_signal,
};
use clap::Args;
use crossbeam_channel::{Receiver, Select, unbounded};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use workpool::job::{JobEvent, JobId, JobSpec, JobStatus, Outcome, Stream};
use workpool::manager::{JobHandle, Manager, WorkerInfo};
use workpool::metrics::Stats;
use workpool::tls::Identity;
use workpool::{Client, ClientConfig, JobStdin, RemoteJob};

/// Where the console's jobs go: a manager in this process, or one over the network.
pub(crate) enum Pool {
    Local(Arc<Manager>),
    Remote(Arc<Client>),
}

/// A job the console follows, local or remote.
pub(crate) enum Handle {
    Local(JobHandle),
    Remote(RemoteJob),
}

impl Handle {
    pub(crate) fn id(&self) -> JobId {
        match self {
            Handle::Local(h) => h.id(),
            Handle::Remote(h) => h.id(),
        }
    }

    pub(crate) fn events(&self) -> &Receiver<JobEvent> {
        match self {
            Handle::Local(h) => h.events(),
            Handle::Remote(h) => h.events(),
        }
    }
}

impl Pool {
    pub(crate) fn submit(&self, spec: JobSpec) -> workpool::Result<Handle> {
        match self {
            Pool::Local(m) => m.submit(spec).map(Handle::Local),
            Pool::Remote(c) => c.submit(spec).map(Handle::Remote),
        }
    }

    pub(crate) fn cancel(&self, id: JobId) -> workpool::Result<()> {
        match self {
            Pool::Local(m) => m.cancel(id),
            Pool::Remote(c) => c.cancel(id),
        }
    }

    pub(crate) fn jobs(&self) -> workpool::Result<Vec<JobStatus>> {
        match self {
            Pool::Local(m) => Ok(m.jobs()),
            Pool::Remote(c) => c.jobs(),
        }
    }

    pub(crate) fn workers(&self) -> workpool::Result<Vec<WorkerInfo>> {
        match self {
            Pool::Local(m) => Ok(m.workers()),
            Pool::Remote(c) => c.workers(),
        }
    }

    pub(crate) fn stats(&self) -> workpool::Result<Stats> {
        match self {
            Pool::Local(m) => Ok(m.stats()),
            Pool::Remote(c) => c.stats(),
        }
    }

    pub(crate) fn is_remote(&self) -> bool {
        matches!(self, Pool::Remote(_))
    }

    /// Cancels the jobs, on a thread of its own (remote calls wait for their answers).
    pub(crate) fn cancel_all(&self, jobs: Vec<JobId>) {
        if let Pool::Remote(c) = self {
            let c = c.clone();
            std::thread::spawn(move || {
                for id in jobs {
                    let _ = c.cancel(id);
                }
            });
        }
    }
}

/// How `submit` and the other remote commands reach the manager (the worker's flags).
#[derive(Args, Debug)]
pub(crate) struct ConnArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// This submitter's certificate (PEM)
    #[arg(long, value_name = "FILE")]
    security_submitter_certificate: Option<PathBuf>,
    /// This submitter's private key (PEM)
    #[arg(long, value_name = "FILE")]
    security_submitter_key: Option<PathBuf>,
    /// Do not check that the manager's certificate names HOST
    #[arg(long)]
    no_verify_hostname: bool,
    /// No TLS at all
    #[arg(long)]
    insecure_plaintext: bool,
    /// One JSON object per line on stdout
    #[arg(long)]
    json: bool,
}

impl ConnArgs {
    fn config(&self) -> Result<ClientConfig, Failure> {
        let (host, port) = (self.pool.host.clone(), self.pool.port);
        if self.insecure_plaintext {
            return Ok(ClientConfig::insecure_plaintext(host, port));
        }
        let why = " (or --insecure-plaintext)";
        let trust = self.pool.trust()?;
        let cert = self
            .security_submitter_certificate
            .clone()
            .ok_or_else(|| usage(format!("--security-submitter-certificate is required{why}")))?;
        let key = self
            .security_submitter_key
            .clone()
            .ok_or_else(|| usage(format!("--security-submitter-key is required{why}")))?;
        let identity = Identity::from_pem_files(cert, key).map_err(failed)?;
        let c = ClientConfig::new(host, port, identity, trust);
        Ok(if self.no_verify_hostname {
            c.no_verify_hostname()
        } else {
            c
        })
    }

    fn connect(&self) -> Result<Arc<Client>, Failure> {
        let config = self.config()?;
        let client = Client::connect(config).map_err(|e| {
            failed(format!(
                "cannot reach the manager at {}:{}: {e}",
                self.pool.host, self.pool.port
            ))
        })?;
        Ok(Arc::new(client))
    }
}

#[derive(Args, Debug)]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// A tag the worker must have (repeatable)
    #[arg(long, value_name = "TAG")]
    tag: Vec<String>,
    /// The platform the worker must report, e.g. linux-x86_64
    #[arg(long, value_name = "PLATFORM")]
    platform: Option<String>,
    /// Deadline from the start (30s, 2m, 1h30m; a bare number is seconds)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// An environment variable for the job (repeatable)
    #[arg(long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Higher runs first among queued jobs
    #[arg(long, value_name = "N", default_value_t = 0, allow_negative_numbers = true, value_parser = number::<i32>)]
    priority: i32,
    /// Times the job is queued again if its worker is lost
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = number::<u32>)]
    retries: u32,
    /// Leave the job running on its own: print its id and exit (see `attach`)
    #[arg(long)]
    detach: bool,
    /// Submit one job per index, FIRST-LAST (e.g. 1-100), each with WORKPOOL_ARRAY_INDEX
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_range)]
    array: Option<(u64, u64)>,
    /// Interactive: forward this command's stdin to the job while it runs, until its
    /// end of file (then the job's stdin is closed)
    #[arg(short = 'i', long, conflicts_with_all = ["array", "detach", "json"])]
    interactive: bool,
    /// Give the job a terminal (a pseudo-terminal of this terminal's size, else 24x80;
    /// window size changes follow). With -i on a terminal, this terminal is raw while
    /// the job runs: every key goes to the job, Ctrl-C included (see --help)
    #[arg(short = 't', long, conflicts_with_all = ["array", "detach", "json"])]
    tty: bool,
    /// The script (its words joined by spaces); without it, jobs are read from stdin,
    /// one per line, as the manager's console reads them
    #[arg(last = true, value_name = "SCRIPT")]
    script: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct AttachArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The job's id
    #[arg(value_name = "ID", value_parser = number::<u64>)]
    id: u64,
}

#[derive(Args, Debug)]
pub(crate) struct CancelArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The job's id
    #[arg(value_name = "ID", value_parser = number::<u64>)]
    id: u64,
}

#[derive(Args, Debug)]
pub(crate) struct QueryArgs {
    #[command(flatten)]
    conn: ConnArgs,
}

/// `FIRST-LAST`, or `N` for `1-N`.
fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("{s:?} is not a range FIRST-LAST (e.g. 1-100)");
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ),
        None => (1, s.trim().parse().map_err(|_| bad())?),
    };
    if first > last {
        return Err(format!(
            "the range {s:?} is empty (its first index is past its last)"
        ));
    }
    Ok((first, last))
}

/// The exit status `submit` and `attach` give for a job's outcome (see the README):
/// the job's own exit code, 128+N for signal N, 124 timed out (as timeout(1)), 125
/// cancelled, 126 spawn failed, 122 worker lost, 123 rejected.
pub(crate) fn exit_status(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::Exited(c) => (*c & 0xff) as u8,
        Outcome::Signaled(n) => (128 + n.clamp(&0, &127)) as u8,
        Outcome::TimedOut => 124,
        Outcome::Cancelled => 125,
        Outcome::SpawnFailed(_) => 126,
        Outcome::WorkerLost => 122,
        _ => 123,
    }
}

/// The SIGINT and SIGTERM this process gets, as a channel (blocked first, so that no
/// thread started later takes them).
fn signals() -> Receiver<i32> {
    signals_with(&[])
}

/// [`signals`], and also the signals in `extra`.
fn signals_with(extra: &[i32]) -> Receiver<i32> {
    let mut set = block_signals();
    if !extra.is_empty() {
        // SAFETY: `set` is an initialised signal set, a live local, and the old mask
        // is not asked for (null).
        unsafe {
            for &sig in extra {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
    }
    let (tx, rx) = unbounded();
    std::thread::spawn(move || {
        loop {
            if tx.send(wait_signal(&set)).is_err() {
                return;
            }
        }
    });
    rx
}

pub(crate) fn submit(a: SubmitArgs) -> Result<ExitCode, Failure> {
    let mut template = JobSpec::new("");
    for t in &a.tag {
        template = template.require_tag(t.clone());
    }
    if let Some(p) = &a.platform {
        template = template.require_platform(p.clone());
    }
    if let Some(t) = a.timeout {
        template = template.timeout(t);
    }
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => template = template.env(k, v),
            _ => return Err(usage(format!("--env takes NAME=VALUE, not {kv:?}"))),
        }
    }
    template = template.priority(a.priority).retries(a.retries);
    if a.detach {
        template = template.detached();
    }
    let script = a.script.join(" ");
    if script.trim().is_empty() && (a.array.is_some() || a.detach) {
        return Err(usage("--array and --detach need a script after --"));
    }
    if script.trim().is_empty() && (a.interactive || a.tty) {
        return Err(usage("-i and -t need a script after --"));
    }
    let plan = terminal::plan(
        a.interactive,
        a.tty,
        terminal::is_terminal(0),
        terminal::window_size(),
    );
    if let Some((rows, cols)) = plan.pty {
        template = template.pty(rows, cols);
    } else if plan.forward_stdin {
        template = template.interactive();
    }
    let signals = if plan.pty.is_some() {
        // SIGHUP and SIGQUIT too, so that they end this process through the path that
        // puts the terminal back; SIGWINCH for the job's window size.
        signals_with(&[libc::SIGHUP, libc::SIGQUIT, libc::SIGWINCH])
    } else {
        signals()
    };
    let client = a.conn.connect()?;
    let json = a.conn.json;
    if script.trim().is_empty() {
        // Jobs from stdin, with the console's directives.
        let mut console = Console::with(Pool::Remote(client.clone()), Out::new(json));
        console.template = template;
        let input = read_lines(Vec::new(), Some(std::io::stdin()));
        return Ok(finish(console, Some(input), signals, false));
    }
    let spec = JobSpec {
        script: script.clone(),
        ..template
    };
    let jobs: Vec<(u64, RemoteJob)> = match a.array {
        Some((first, last)) => client
            .submit_array(spec, first, last)
            .map_err(|e| failed(format!("the jobs were not submitted: {e}")))?
            .into_iter()
            .zip(first..)
            .map(|(j, i)| (i, j))
            .collect(),
        None => {
            let j = client
                .submit(spec)
                .map_err(|e| failed(format!("the job was not submitted: {e}")))?;
            vec![(j.id().0, j)]
        }
    };
    if a.detach {
        let mut out = Out::new(json);
        for (_, j) in &jobs {
            if json {
                out.event(&Event::Submitted {
                    job: j.id().0,
                    command: &script,
                });
            } else {
                out.say(&j.id().0.to_string());
            }
        }
        out.flush();
        drop(jobs);
        close(client);
        return Ok(ExitCode::SUCCESS);
    }
    if a.interactive || a.tty {
        let (_, job) = jobs.into_iter().next().expect("one job");
        let code = interact(&job, &plan, &signals);
        drop(job);
        close(client);
        return code.map(ExitCode::from);
    }
    if jobs.len() == 1 && !json {
        let (_, job) = jobs.into_iter().next().expect("one job");
        let code = follow_raw(&job, &signals, Local::default());
        drop(job);
        close(client);
        return Ok(ExitCode::from(code));
    }
    let single = jobs.len() == 1;
    let mut console = Console::with(Pool::Remote(client.clone()), Out::new(json));
    for (index, j) in jobs {
        let label = if json || single { j.id().0 } else { index };
        console.follow(Handle::Remote(j), label, &script);
    }
    let input = read_lines(Vec::new(), None);
    Ok(finish(console, Some(input), signals, single))
}

/// Runs the console over remote jobs until they have all ended (or a signal cancelled
/// them), prints the summary, and gives the exit status: a single job's own status,
/// 128+N after signal N, else 1 if any job did not succeed.
fn finish(
    console: Console,
    input: Option<Receiver<Input>>,
    signals: Receiver<i32>,
    single: bool,
) -> ExitCode {
    let (stop, summary) = console.run_remote(input, signals);
    match stop {
        Stop::Signal(sig) => ExitCode::from(128 + sig as u8),
        _ if single => ExitCode::from(summary.last.as_ref().map_or(123, exit_status)),
        _ if summary.failed > 0 => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}

/// What a remote console run saw.
pub(crate) struct Summary {
    pub failed: u64,
    pub last: Option<Outcome>,
}

/// Closes the connection (a goodbye: the manager cancels attached jobs that are left,
/// and none are when this is called).
fn close(client: Arc<Client>) {
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close();
    }
}

/// An interactive job (`-i`, `-t`): its stdin forwarded or closed, this terminal raw
/// while it runs if the plan says so, then [`follow_raw`]. Raw mode ends when this
/// returns (or panics: see [`terminal`]).
fn interact(job: &RemoteJob, plan: &Plan, signals: &Receiver<i32>) -> Result<u8, Failure> {
    let id = job.id();
    if let Some(note) = plan.note {
        eprintln!("{note}");
    }
    let stdin = match job.stdin() {
        Ok(w) => w,
        Err(e) => {
            let _ = job.cancel();
            return Err(failed(format!(
                "job {id}: its stdin cannot be written: {e}"
            )));
        }
    };
    let raw = if plan.raw {
        match RawMode::enter(0) {
            Ok(r) => Some(r),
            Err(e) => {
                let _ = job.cancel();
                return Err(failed(format!("cannot put the terminal in raw mode: {e}")));
            }
        }
    } else {
        None
    };
    let local = Local {
        eol: if raw.is_some() && terminal::is_terminal(2) {
            "\r\n"
        } else {
            "\n"
        },
        resize: plan.resize,
    };
    if plan.forward_stdin {
        forward_stdin(stdin, id, local.eol);
    } else {
        // `-t` alone: the job's stdin ends at once, as with `kubectl exec -t`.
        let _ = stdin.close();
    }
    let code = follow_raw(job, signals, local);
    drop(raw);
    Ok(code)
}

/// A thread that copies this process's stdin to the job's as it comes (a keystroke at
/// a time in raw mode, a line at a time on a terminal that is not, a pipe's chunks),
/// and closes the job's stdin at our end of file. It stops quietly when the job's
/// stdin is closed (the job closed it or ended); it may stay blocked reading until the
/// process exits.
fn forward_stdin(mut to: JobStdin, id: JobId, eol: &'static str) {
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut from = stdin.lock();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => {
                    let _ = to.close();
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprint!("workpool: job {id}: reading stdin: {e}; its stdin is closed{eol}");
                    let _ = to.close();
                    return;
                }
            };
            if let Err(e) = to.write_all(&buf[..n]).and_then(|()| to.flush()) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    eprint!("workpool: job {id}: its stdin: {e}{eol}");
                }
                return;
            }
        }
    });
}

/// What [`follow_raw`] does for this process's terminal.
#[derive(Clone, Copy, Debug)]
struct Local {
    /// The end of the lines it writes on stderr ("\r\n" while the terminal is raw).
    eol: &'static str,
    /// Whether SIGWINCH sends this terminal's size to the job.
    resize: bool,
}

impl Default for Local {
    fn default() -> Local {
        Local {
            eol: "\n",
            resize: false,
        }
    }
}

/// Writes one job's output to this process's stdout and stderr as it comes, byte for
/// byte; SIGINT or SIGTERM (and, for a terminal job, SIGHUP and SIGQUIT) cancels the
/// job (a second one exits at once, after putting the terminal back); SIGWINCH resizes
/// a terminal job's window. Returns the exit status for its outcome, or 128+N after
/// signal N.
fn follow_raw(job: &RemoteJob, signals: &Receiver<i32>, local: Local) -> u8 {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let mut out = std::io::BufWriter::with_capacity(64 << 10, stdout.lock());
    let mut err = stderr.lock();
    let mut signalled: Option<i32> = None;
    let id = job.id();
    let eol = local.eol;
    let mut size = terminal::window_size();
    loop {
        let mut sel = Select::new();
        let ev_i = sel.recv(job.events());
        let sig_i = sel.recv(signals);
        let op = sel.select();
        if op.index() == sig_i {
            let Ok(sig) = op.recv(signals) else { continue };
            if sig == libc::SIGWINCH {
                let now = terminal::window_size();
                if local.resize && now != size {
                    size = now;
                    if let Some((rows, cols)) = now {
                        let _ = job.resize(rows, cols);
                    }
                }
                continue;
            }
            if signalled.is_some() {
                let _ = out.flush();
                terminal::restore();
                std::process::exit(128 + sig);
            }
            let _ = write!(
                err,
                "workpool: {}: cancelling job {id}{eol}",
                super::signal_name(sig)
            );
            let _ = job.cancel();
            signalled = Some(sig);
            continue;
        }
        debug_assert_eq!(op.index(), ev_i);
        let ev = op.recv(job.events());
        let code = match ev {
            Ok(JobEvent::Output { stream, bytes }) => {
                match stream {
                    Stream::Stdout => {
                        let _ = out.write_all(&bytes);
                    }
                    Stream::Stderr => {
                        let _ = out.flush();
                        let _ = err.write_all(&bytes);
                    }
                }
                if job.events().is_empty() {
                    let _ = out.flush();
                }
                continue;
            }
            Ok(JobEvent::Warning(w)) => {
                let _ = out.flush();
                let _ = write!(err, "workpool: job {id}: warning: {w}{eol}");
                continue;
            }
            Ok(JobEvent::Requeued { attempt }) => {
                let _ = out.flush();
                let _ = write!(
                    err,
                    "workpool: job {id}: its worker was lost; queued again (attempt {attempt}){eol}"
                );
                continue;
            }
            Ok(JobEvent::Finished(outcome)) => {
                let _ = out.flush();
                if !matches!(outcome, Outcome::Exited(_)) {
                    let _ = write!(err, "workpool: job {id} {}{eol}", ended_how(&outcome));
                }
                exit_status(&outcome)
            }
            Ok(_) => continue,
            Err(_) => {
                let _ = out.flush();
                let _ = write!(err, "workpool: job {id}: the client stopped{eol}");
                123
            }
        };
        return match signalled {
            Some(sig) => (128 + sig) as u8,
            None => code,
        };
    }
}

/// "timed out", "was cancelled", ... for the line `submit` prints on stderr.
fn ended_how(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Signaled(n) => format!("was killed by signal {n}"),
        Outcome::TimedOut => "timed out".into(),
        Outcome::Cancelled => "was cancelled".into(),
        Outcome::WorkerLost => "lost its worker".into(),
        Outcome::SpawnFailed(why) => format!("could not start: {why}"),
        Outcome::Rejected(why) => format!("was rejected: {why}"),
        other => format!("ended: {other}"),
    }
}

pub(crate) fn attach(a: AttachArgs) -> Result<ExitCode, Failure> {
    let signals = signals();
    let client = a.conn.connect()?;
    let job = client
        .attach(JobId(a.id))
        .map_err(|e| failed(format!("cannot attach to job {}: {e}", a.id)))?;
    if !a.conn.json {
        let code = follow_raw(&job, &signals, Local::default());
        drop(job);
        close(client);
        return Ok(ExitCode::from(code));
    }
    let mut console = Console::with(Pool::Remote(client.clone()), Out::new(true));
    let label = job.id().0;
    console.follow_quietly(Handle::Remote(job), label);
    let input = read_lines(Vec::new(), None);
    Ok(finish(console, Some(input), signals, true))
}

/// `jobs`, `workers` and `status`: the console's listing, once.
pub(crate) fn query(a: QueryArgs, what: &str) -> Result<ExitCode, Failure> {
    let client = a.conn.connect()?;
    let mut console = Console::with(Pool::Remote(client.clone()), Out::new(a.conn.json));
    match what {
        "jobs" => console.list_jobs(),
        "workers" => console.list_workers(),
        _ => console.status(),
    }
    let failed = console.failed > 0;
    console.out.flush();
    drop(console);
    close(client);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub(crate) fn cancel(a: CancelArgs) -> Result<ExitCode, Failure> {
    let client = a.conn.connect()?;
    let done = client.cancel(JobId(a.id));
    close(client);
    done.map_err(|e| failed(format!("cannot cancel job {}: {e}", a.id)))?;
    Ok(ExitCode::SUCCESS)
}
