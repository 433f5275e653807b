//! The local side of `submit -i` / `-t`: what to do with this process's terminal (a
//! plain decision, [`plan`]), its size, and raw mode that is undone on every way out.
//!
//! Raw mode is undone by [`restore`], which is idempotent and called by the guard's
//! `Drop` (a normal end or an error), by a panic hook (any thread's panic), and before
//! `std::process::exit` (a second signal); SIGTERM, SIGHUP and SIGQUIT are taken by
//! the signal thread (see `remote::signals`), so they end the process through those
//! paths too, never by their default action. In raw mode Ctrl-C, Ctrl-\ and Ctrl-Z are
//! bytes that go to the job, as with `ssh -t` and `kubectl exec -it`.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Mutex, Once};

/// The size a job's terminal gets when neither stdin nor stdout is a terminal.
pub(crate) const DEFAULT_SIZE: (u16, u16) = (24, 80);

/// What `submit` does for the flags it was given and the terminal it runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The job's pseudo-terminal, rows × columns (`-t`).
    pub pty: Option<(u16, u16)>,
    /// Whether this process's stdin is forwarded to the job while it runs (`-i`);
    /// otherwise an interactive job's stdin is closed at once.
    pub forward_stdin: bool,
    /// Whether the local terminal (stdin) is put in raw mode.
    pub raw: bool,
    /// Whether window size changes are forwarded (SIGWINCH).
    pub resize: bool,
    /// A line for stderr before the job starts.
    pub note: Option<&'static str>,
}

pub(crate) const NOT_A_TERMINAL: &str = "workpool: stdin is not a terminal: it is forwarded \
     as it is, without raw mode (the job still gets a terminal)";

/// The decision, as `kubectl exec` and `docker run` make it: `-i` forwards stdin; `-t`
/// gives the job a terminal of `size` (this terminal's, if it has one, else
/// [`DEFAULT_SIZE`]) and forwards resizes; raw mode needs both (keys are only read
/// with `-i`) and a terminal on stdin. `-t` alone leaves the local terminal as it is:
/// Ctrl-C there cancels the job as for any `submit`.
pub(crate) fn plan(
    interactive: bool,
    tty: bool,
    stdin_is_terminal: bool,
    size: Option<(u16, u16)>,
) -> Plan {
    if !tty {
        return Plan {
            pty: None,
            forward_stdin: interactive,
            raw: false,
            resize: false,
            note: None,
        };
    }
    Plan {
        pty: Some(size.unwrap_or(DEFAULT_SIZE)),
        forward_stdin: interactive,
        raw: interactive && stdin_is_terminal,
        resize: true,
        note: (interactive && !stdin_is_terminal).then_some(NOT_A_TERMINAL),
    }
}

/// Whether `fd` is a terminal.
pub(crate) fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty only looks at the descriptor number; a closed one gives 0.
    unsafe { libc::isatty(fd) == 1 }
}

/// The window size of the first of stdin and stdout that is a terminal (rows, columns),
/// if either is and says a size that is not zero.
pub(crate) fn window_size() -> Option<(u16, u16)> {
    [0, 1].into_iter().find_map(|fd| {
        // SAFETY: zeroed is a valid winsize (plain integers).
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which is to a live
        // local of that type.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
    })
}

/// The terminal settings raw mode replaced, while it is on.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);
static HOOK: Once = Once::new();

/// Raw mode on a terminal, while this lives (see [`restore`]).
pub(crate) struct RawMode(());

impl RawMode {
    /// Puts `fd` in raw mode (`cfmakeraw` on a copy of its settings), after installing
    /// the panic hook that undoes it.
    pub(crate) fn enter(fd: RawFd) -> io::Result<RawMode> {
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        // SAFETY: zeroed is a valid termios (plain integers and arrays).
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios through a pointer to a live local.
        if unsafe { libc::tcgetattr(fd, &mut original) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = original;
        // SAFETY: cfmakeraw only changes the termios it is given, a live local.
        unsafe { libc::cfmakeraw(&mut raw) };
        {
            let mut saved = SAVED.lock().unwrap_or_else(|p| p.into_inner());
            // A nested enter keeps the first settings, which are the ones to go back to.
            if saved.is_none() {
                *saved = Some((fd, original));
            }
        }
        // SAFETY: tcsetattr reads one termios through a pointer to a live local.
        if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &raw) } != 0 {
            let e = io::Error::last_os_error();
            restore();
            return Err(e);
        }
        Ok(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts the terminal back as it was before raw mode, if raw mode is on; else nothing.
/// Safe to call from any thread, any number of times (also from the panic hook while
/// another thread panicked holding nothing of ours: the lock is never held across a
/// call that could panic).
pub(crate) fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((fd, termios)) = saved {
        // SAFETY: tcsetattr reads one termios through a pointer to a live local.
        unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &termios) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_follows_the_flags_and_the_terminal() {
        let p = plan(true, false, true, Some((50, 200)));
        assert_eq!(
            (p.pty, p.forward_stdin, p.raw, p.resize),
            (None, true, false, false)
        );
        let p = plan(false, false, true, None);
        assert_eq!((p.pty, p.forward_stdin, p.raw), (None, false, false));
        let p = plan(true, true, true, Some((50, 200)));
        assert_eq!(
            (p.pty, p.forward_stdin, p.raw, p.resize, p.note),
            (Some((50, 200)), true, true, true, None)
        );
        let p = plan(true, true, false, None);
        assert_eq!(
            (p.pty, p.forward_stdin, p.raw, p.note),
            (Some(DEFAULT_SIZE), true, false, Some(NOT_A_TERMINAL))
        );
        let p = plan(false, true, true, Some((30, 90)));
        assert_eq!(
            (p.pty, p.forward_stdin, p.raw, p.resize, p.note),
            (Some((30, 90)), false, false, true, None)
        );
    }

    fn lflag(fd: RawFd) -> libc::tcflag_t {
        // SAFETY: zeroed is a valid termios.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios through a pointer to a live local.
        assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
        t.c_lflag
    }

    #[test]
    fn raw_mode_is_undone_by_its_end_and_by_a_panic() {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two descriptors through pointers to live locals; the
        // name, settings and size pointers may be null.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty: {}", io::Error::last_os_error());
        let cooked = lflag(slave);
        assert_ne!(cooked & libc::ICANON, 0);
        assert_ne!(cooked & libc::ECHO, 0);
        {
            let _raw = RawMode::enter(slave).unwrap();
            assert_eq!(lflag(slave) & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        }
        assert_eq!(lflag(slave), cooked);
        let panicked = std::panic::catch_unwind(|| {
            let raw = RawMode::enter(slave).unwrap();
            assert_eq!(lflag(slave) & libc::ICANON, 0);
            // Forgotten: only the hook can undo it.
            std::mem::forget(raw);
            panic!("on purpose");
        });
        assert!(panicked.is_err());
        assert_eq!(lflag(slave), cooked);
        // SAFETY: the two descriptors are ours and not used after.
        unsafe {
            libc::close(master);
            libc::close(slave);
        }
    }
}
