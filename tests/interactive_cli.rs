//! `workpool submit -i` and `-t` as a person uses them: the CLI runs in a
//! pseudo-terminal this test opens (the CLI a session leader with the terminal's slave as
//! its stdin, stdout, stderr and controlling terminal), and the test types into the
//! master and reads what the terminal shows; or, for `-i` alone, with pipes. Against a
//! manager (in this process) that trusts worker 0 as a worker and workers 1 and 2's
//! certificates as submitters only, as in tests/submit.rs.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use workpool::manager::Manager;
use workpool::worker::Worker;

struct Pool {
    dir: PathBuf,
    manager: Manager,
    _worker: Worker,
}

/// A manager with one worker of two slots; submitter certificates 1 and 2 written to a
/// fresh folder.
fn pool(name: &str) -> Pool {
    let dir = scratch(name);
    let certs = Certs::new(3);
    certs.write_to(&dir);
    let config = certs.submitters_manager_config();
    let (manager, worker) = certs.manager_and_worker(config, 2);
    Pool {
        dir,
        manager,
        _worker: worker,
    }
}

impl Pool {
    /// `workpool submit` with the connection flags of submitter 1, then `rest`.
    fn submit(&self, rest: &[&str]) -> Command {
        let path = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
        let mut c = Command::new(cli());
        c.arg("submit")
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.manager.local_addr().port().to_string())
            .args(["--security-pool-certificate", &path("host-cert.pem")])
            .args([
                "--security-submitter-certificate",
                &path("worker-1-cert.pem"),
            ])
            .args(["--security-submitter-key", &path("worker-1-key.pem")])
            .args(rest)
            .env("RUST_LOG", "warn");
        c
    }
}

/// Bytes that grow as a reader thread adds to them.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<u8>>>, Arc<AtomicBool>);

impl Seen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Everything, once the reader has reached the end (with the deadline).
    fn all(&self) -> String {
        wait_until("the output's end", || self.1.load(Ordering::Relaxed));
        self.text()
    }

    fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    /// Waits (with the deadline) until `needle` has been seen.
    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?}; seen: {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A thread that appends what `from` gives until its end.
    fn collect(&self, mut from: impl Read + Send + 'static) {
        let seen = self.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.0.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            seen.1.store(true, Ordering::Relaxed);
        });
    }
}

/// The settings of a terminal that raw mode changes, to compare before and after.
#[derive(Debug, PartialEq, Eq)]
struct Modes {
    iflag: libc::tcflag_t,
    oflag: libc::tcflag_t,
    cflag: libc::tcflag_t,
    lflag: libc::tcflag_t,
    cc: Vec<libc::cc_t>,
}

/// A pseudo-terminal the test holds both ends of, with a thread that reads all the
/// master gives (what the terminal shows) until the test ends.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
    shown: Seen,
    stop: Arc<AtomicBool>,
}

impl Pty {
    fn open(rows: u16, cols: u16) -> Pty {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors through pointers to live locals and
        // reads the size from one; the name and settings pointers may be null.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty just made these two descriptors, and nothing else owns them.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let pty = Pty {
            master,
            slave,
            shown: Seen::default(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let fd = pty.master.try_clone().unwrap();
        let (shown, stop) = (pty.shown.clone(), pty.stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Polled with a timeout so that the thread notices the test's end (the
            // master would not end while the test holds the slave).
            while !stop.load(Ordering::Relaxed) {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd, a live local.
                if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
                    continue;
                }
                // SAFETY: reads into a live local buffer of the length given.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    return;
                }
                shown
                    .0
                    .lock()
                    .unwrap()
                    .extend_from_slice(&buf[..n as usize]);
            }
        });
        pty
    }

    /// `command` with the slave as its stdin, stdout and stderr, in a session of its
    /// own with the slave as its controlling terminal.
    fn spawn(&self, mut command: Command) -> Child {
        let stdio = || Stdio::from(self.slave.try_clone().unwrap());
        command.stdin(stdio()).stdout(stdio()).stderr(stdio());
        // SAFETY: between fork and exec the closure calls only setsid and ioctl, which
        // are async-signal-safe, and touches no memory of the parent's.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.spawn().unwrap()
    }

    /// Types `bytes` on the terminal's keyboard.
    fn type_in(&self, bytes: &[u8]) {
        let mut w = std::fs::File::from(self.master.try_clone().unwrap());
        w.write_all(bytes).unwrap();
    }

    fn modes(&self) -> Modes {
        modes(self.slave.as_raw_fd())
    }

    /// Waits until the terminal is raw (the CLI has set it up); fails at once if the CLI
    /// has ended.
    fn wait_raw(&self, cli: &mut Child) {
        wait_until("the CLI puts the terminal in raw mode", || {
            if let Some(status) = cli.try_wait().unwrap() {
                panic!("the CLI ended ({status}): {}", self.shown.text());
            }
            self.modes().lflag & (libc::ICANON | libc::ECHO | libc::ISIG) == 0
        });
    }

    /// The terminal's window changes size (as a terminal emulator's does).
    fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize through a pointer to a live local.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(r, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn modes(fd: RawFd) -> Modes {
    // SAFETY: zeroed is a valid termios (integers and arrays).
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios through a pointer to a live local.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
    Modes {
        iflag: t.c_iflag,
        oflag: t.c_oflag,
        cflag: t.c_cflag,
        lflag: t.c_lflag,
        cc: t.c_cc.to_vec(),
    }
}

/// Waits (with the deadline) for the child's exit.
fn exit_of(child: &mut Child) -> ExitStatus {
    let mut status = None;
    wait_until("the CLI exits", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill takes no pointers; the PID is our own child's, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn a_shell_under_it_runs_what_is_typed_and_the_terminal_is_put_back() {
    let p = pool("it-shell");
    let pty = Pty::open(24, 80);
    let cooked = pty.modes();
    assert_ne!(cooked.lflag & libc::ICANON, 0);
    assert_ne!(cooked.lflag & libc::ECHO, 0);
    // (A non-interactive bash, the one that runs the script, drops PS1 from what it
    // was given: it is set for the interactive one only.)
    let mut cli = pty.spawn(p.submit(&[
        "-it",
        "--",
        "PS1='prompt> ' exec bash --norc --noprofile -i",
    ]));
    pty.wait_raw(&mut cli);
    pty.shown.wait_for("prompt> ");
    pty.type_in(b"echo $((6 * 7)); tty\r");
    // The answer (the typed line comes back too, echoed by the job's shell, with
    // `$((6 * 7))` in it, not `42`), then the job's terminal.
    pty.shown.wait_for("42\r\n/dev/pts/");
    pty.type_in(b"exit 3\r");
    let status = exit_of(&mut cli);
    assert_eq!(status.code(), Some(3), "{}", pty.shown.text());
    assert_eq!(pty.modes(), cooked, "the terminal is as it was");
}

#[test]
fn ctrl_c_under_it_interrupts_the_job_not_the_cli() {
    let p = pool("it-ctrl-c");
    let pty = Pty::open(24, 80);
    let cooked = pty.modes();
    let mut cli = pty.spawn(p.submit(&["-it", "--", "echo ready; exec sleep 100"]));
    pty.wait_raw(&mut cli);
    pty.shown.wait_for("ready");
    pty.type_in(b"\x03");
    let status = exit_of(&mut cli);
    assert_eq!(status.code(), Some(130), "{}", pty.shown.text());
    assert!(
        pty.shown.text().contains("killed by signal 2"),
        "{}",
        pty.shown.text()
    );
    assert!(
        !pty.shown.text().contains("cancelling"),
        "{}",
        pty.shown.text()
    );
    assert_eq!(pty.modes(), cooked, "the terminal is as it was");
}

#[test]
fn sigterm_or_sighup_under_it_cancels_the_job_and_puts_the_terminal_back() {
    let p = pool("it-sigterm");
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGHUP, 129)] {
        let pty = Pty::open(24, 80);
        let cooked = pty.modes();
        let mut cli = pty.spawn(p.submit(&["-it", "--", "echo ready; exec sleep 100"]));
        pty.wait_raw(&mut cli);
        pty.shown.wait_for("ready");
        signal(&cli, sig);
        let status = exit_of(&mut cli);
        assert_eq!(status.code(), Some(code), "{}", pty.shown.text());
        assert!(
            pty.shown.text().contains("cancelling job"),
            "{}",
            pty.shown.text()
        );
        assert_eq!(pty.modes(), cooked, "the terminal is as it was");
    }
    wait_until("no job is left", || p.manager.jobs().is_empty());
}

#[test]
fn the_job_s_terminal_has_this_terminal_s_size_and_follows_its_changes() {
    let p = pool("it-resize");
    let pty = Pty::open(30, 100);
    let cooked = pty.modes();
    let mut cli =
        pty.spawn(p.submit(&["-it", "--", "stty size; while read x; do stty size; done"]));
    pty.wait_raw(&mut cli);
    pty.shown.wait_for("30 100\r\n");
    pty.resize(40, 120);
    // The kernel tells the terminal's foreground process group; so does the test, as
    // a terminal emulator's resize might reach a process that is not in it.
    signal(&cli, libc::SIGWINCH);
    // The resize and the typed lines travel separately: each Enter prints the size the
    // job's terminal has then, until it is the new one.
    wait_until("the job's terminal has the new size", || {
        let before = pty.shown.count(" 100\r\n") + pty.shown.count(" 120\r\n");
        pty.type_in(b"\r");
        wait_until("the job answers the line", || {
            pty.shown.count(" 100\r\n") + pty.shown.count(" 120\r\n") > before
        });
        pty.shown.text().contains("40 120\r\n")
    });
    pty.type_in(b"\x04");
    let status = exit_of(&mut cli);
    assert_eq!(status.code(), Some(0), "{}", pty.shown.text());
    assert_eq!(pty.modes(), cooked, "the terminal is as it was");
}

#[test]
fn i_without_a_terminal_forwards_a_pipe_live_and_closes_it_at_its_end() {
    let p = pool("i-pipe");
    // All at once, then the end: the job sees both lines, then its end of file.
    let mut child = p
        .submit(&["-i", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"a\nb\n").unwrap();
    let (out, err) = (Seen::default(), Seen::default());
    out.collect(child.stdout.take().unwrap());
    err.collect(child.stderr.take().unwrap());
    let status = exit_of(&mut child);
    assert_eq!(status.code(), Some(0), "{}", err.all());
    assert_eq!(out.all(), "a\nb\n");
    // One line at a time: each comes back before the next is written.
    let mut child = p
        .submit(&["-i", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (out, err) = (Seen::default(), Seen::default());
    out.collect(child.stdout.take().unwrap());
    err.collect(child.stderr.take().unwrap());
    for line in ["one\n", "two\n", "three\n"] {
        stdin.write_all(line.as_bytes()).unwrap();
        out.wait_for(line);
    }
    assert_eq!(out.text(), "one\ntwo\nthree\n");
    drop(stdin);
    assert_eq!(exit_of(&mut child).code(), Some(0), "{}", err.text());
}

#[test]
fn a_job_that_closes_its_stdin_first_ends_the_cli_quietly() {
    let p = pool("i-head");
    let mut child = p
        .submit(&["-i", "--", "head -c 1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Our end stays open: the CLI must not wait for it.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"xyz").unwrap();
    let (out, err) = (Seen::default(), Seen::default());
    out.collect(child.stdout.take().unwrap());
    err.collect(child.stderr.take().unwrap());
    let status = exit_of(&mut child);
    assert_eq!(status.code(), Some(0), "{}", err.all());
    assert_eq!(out.all(), "x");
    // The bytes the job did not read are refused: quietly.
    assert_eq!(err.all(), "", "nothing on stderr");
    drop(stdin);
}

#[test]
fn it_with_a_pipe_for_stdin_says_so_and_the_job_still_gets_a_terminal() {
    let p = pool("it-pipe");
    let mut child = p
        .submit(&["-it", "--", "tty; stty size"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let (out, err) = (Seen::default(), Seen::default());
    out.collect(child.stdout.take().unwrap());
    err.collect(child.stderr.take().unwrap());
    let status = exit_of(&mut child);
    assert_eq!(status.code(), Some(0), "{}", err.all());
    // Neither stdin nor stdout is a terminal here: 24x80.
    let out = out.all();
    assert!(out.starts_with("/dev/pts/"), "{out}");
    assert!(out.contains("24 80"), "{out}");
    assert!(
        err.all().contains("stdin is not a terminal"),
        "{}",
        err.text()
    );
}

#[test]
fn t_alone_leaves_the_terminal_cooked_and_ctrl_c_there_cancels_the_job() {
    let p = pool("t-alone");
    let pty = Pty::open(24, 80);
    let cooked = pty.modes();
    let mut cli = pty.spawn(p.submit(&["-t", "--", "tty; echo ready; exec sleep 100"]));
    pty.shown.wait_for("ready");
    assert!(
        pty.shown.text().starts_with("/dev/pts/"),
        "{}",
        pty.shown.text()
    );
    assert_eq!(pty.modes(), cooked, "no raw mode without -i");
    // Ctrl-C on this terminal is SIGINT to the CLI, which cancels the job.
    pty.type_in(b"\x03");
    let status = exit_of(&mut cli);
    assert_eq!(status.code(), Some(130), "{}", pty.shown.text());
    pty.shown.wait_for("was cancelled");
    assert!(
        pty.shown.text().contains("SIGINT: cancelling job"),
        "{}",
        pty.shown.text()
    );
    assert_eq!(pty.modes(), cooked);
}
