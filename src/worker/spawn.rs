//! Starting a job's process: `/bin/bash -c SCRIPT` in the job's folder, in a process
//! group of its own, with its environment, stdin from a pipe or `/dev/null`, stdout and
//! stderr into pipes, an empty signal mask and every signal at its default disposition,
//! and no descriptor beyond 0, 1 and 2 — however careless the program embedding the
//! worker was with its own descriptors.
//!
//! Two ways to get there:
//! - `posix_spawn` (glibc's clones the caller without copying its memory, `vfork`-like),
//!   when glibc has `posix_spawn_file_actions_addchdir_np` (2.29) and
//!   `posix_spawn_file_actions_addclosefrom_np` (2.34); both are looked up once, at run
//!   time, so that a build on an older glibc still links and runs.
//! - `fork` (std's `Command` with a hook run before `exec`) for everything else: a job
//!   user (`setgroups`, `setgid`, `setuid` have no spawn attribute), other C libraries.
//!
//! A terminal job (`JobSpec::pty`) gets a new pseudo-terminal instead of pipes, from
//! `posix_openpt`, `grantpt`, `unlockpt` and `ptsname_r` through libc (all in the C
//! library itself, where `openpty` needs libutil on older glibc; no crate needed): its
//! size is set on the master (`TIOCSWINSZ`) before the job starts, and the job's child
//! becomes the leader of a new session (`setsid`, which also makes it the leader of a
//! process group of its own, as every job is) with the slave as its controlling
//! terminal (`TIOCSCTTY`) on 0, 1 and 2. Such a job always takes the `fork` way:
//! `posix_spawn` has `POSIX_SPAWN_SETSID` but no `TIOCSCTTY`, and acquiring the terminal
//! by opening it in a file action would depend on the order glibc runs its steps in.
//!
//! A job's environment is the worker process's environment as captured when the worker
//! started ([`capture_environment`]), with the job's variables over it. It is built into
//! the `envp` array once per job; the captured part is shared, not copied.

use super::job_user::{self, JobUser};
use crate::job::PtySize;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, RwLock};

/// The shell every job runs in.
pub(crate) const SHELL: &str = "/bin/bash";

/// The worker process's environment, as `NAME=value` strings.
struct Environment {
    /// Each entry, and the length of its name.
    entries: Vec<(CString, usize)>,
}

static INHERITED: RwLock<Option<Arc<Environment>>> = RwLock::new(None);

/// Takes a copy of this process's environment for the jobs to come (called when a
/// worker starts; a later change to the process's environment reaches jobs only when
/// another worker starts).
pub(crate) fn capture_environment() {
    let env = Arc::new(read_environment());
    *INHERITED.write().unwrap_or_else(|e| e.into_inner()) = Some(env);
}

fn inherited() -> Arc<Environment> {
    if let Some(env) = &*INHERITED.read().unwrap_or_else(|e| e.into_inner()) {
        return env.clone();
    }
    capture_environment();
    inherited()
}

fn read_environment() -> Environment {
    let entries = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = Vec::with_capacity(k.len() + v.len() + 2);
            kv.extend_from_slice(k.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            Some((CString::new(kv).ok()?, k.len()))
        })
        .collect();
    Environment { entries }
}

/// What to start.
pub(crate) struct Launch<'a> {
    pub script: &'a str,
    /// The working directory.
    pub dir: &'a Path,
    /// Variables over the inherited environment, later ones winning.
    pub vars: &'a [(&'a str, &'a str)],
    /// A pipe for stdin (else `/dev/null`).
    pub stdin: bool,
    /// Our end of that pipe non-blocking (an interactive job's, written as it reads).
    pub live: bool,
    /// A new terminal of this size for stdin, stdout and stderr instead (`stdin` and
    /// `live` are then not looked at).
    pub pty: Option<PtySize>,
    pub user: Option<&'a JobUser>,
}

/// A started job process, not reaped: the caller reaps it ([`wait`]).
pub(crate) struct Process {
    pub pid: i32,
    /// Our end of its stdin, if it has a pipe (blocking, unless `Launch::live`); for a
    /// terminal job, a second descriptor of the terminal's master (non-blocking).
    pub stdin: Option<OwnedFd>,
    /// Our ends of its stdout and stderr (non-blocking); for a terminal job, the master
    /// (stdout and stderr merged), and no stderr.
    pub stdout: OwnedFd,
    pub stderr: Option<OwnedFd>,
}

/// Starts a job's process (see the module's comment).
pub(crate) fn spawn(launch: &Launch) -> io::Result<Process> {
    let script = CString::new(launch.script)
        .map_err(|_| invalid("the script contains a NUL byte".into()))?;
    let env = Env::new(inherited(), launch)?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if launch.user.is_none()
        && launch.pty.is_none()
        && let Some(actions) = glibc::actions()
    {
        return glibc::spawn(actions, &script, launch, &env);
    }
    fork(launch, script, env)
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

/// A job's environment: the inherited entries it does not set, then its own.
struct Env {
    inherited: Arc<Environment>,
    /// The job's own `NAME=value` entries, one per name, and each name's length.
    own: Vec<(CString, usize)>,
}

impl Env {
    fn new(inherited: Arc<Environment>, launch: &Launch) -> io::Result<Env> {
        let user = launch.user.map(|u| {
            [
                ("HOME", u.home.as_bytes()),
                ("USER", u.name.as_bytes()),
                ("LOGNAME", u.name.as_bytes()),
            ]
        });
        let vars = user
            .iter()
            .flatten()
            .copied()
            .chain(launch.vars.iter().map(|&(k, v)| (k, v.as_bytes())));
        let mut own: Vec<(CString, usize)> = Vec::with_capacity(launch.vars.len() + 3);
        for (name, value) in vars {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(invalid(format!(
                    "{name:?} is not a valid environment variable name"
                )));
            }
            let mut kv = Vec::with_capacity(name.len() + value.len() + 2);
            kv.extend_from_slice(name.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(value);
            let kv = CString::new(kv)
                .map_err(|_| invalid(format!("the value of {name} contains a NUL byte")))?;
            match own.iter_mut().find(|(e, n)| key(e, *n) == name.as_bytes()) {
                Some(slot) => slot.0 = kv,
                None => own.push((kv, name.len())),
            }
        }
        Ok(Env { inherited, own })
    }

    /// Every entry, in the order they go to the job.
    fn entries(&self) -> impl Iterator<Item = &CStr> {
        let overridden = |name: &[u8]| self.own.iter().any(|(e, n)| key(e, *n) == name);
        let inherited = self.inherited.entries.iter();
        inherited
            .filter(move |(e, n)| !overridden(key(e, *n)))
            .chain(self.own.iter())
            .map(|(e, _)| e.as_c_str())
    }

    /// The entries as a null-terminated `envp` (pointing into `self`).
    fn pointers(&self) -> Vec<*const libc::c_char> {
        let mut envp: Vec<*const libc::c_char> = self.entries().map(CStr::as_ptr).collect();
        envp.push(std::ptr::null());
        envp
    }
}

fn key(entry: &CStr, len: usize) -> &[u8] {
    &entry.to_bytes()[..len]
}

/// A pipe whose two ends are close-on-exec, numbered above 2 (so that placing the job's
/// ends on 0, 1 and 2 never overwrites one of them), ours non-blocking if asked.
fn pipe(ours_nonblocking: bool, ours_is_read: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // Close-on-exec from the start where the kernel can: no other thread's fork sees them.
    #[cfg(target_os = "linux")]
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    #[cfg(not(target_os = "linux"))]
    // SAFETY: `fds` has room for the two descriptors pipe writes.
    let r = unsafe { libc::pipe(fds.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe succeeded, so both descriptors are new and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let (r, w) = (above_stdio(r)?, above_stdio(w)?);
    if ours_nonblocking {
        let ours = if ours_is_read { &r } else { &w };
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        unsafe {
            let flags = libc::fcntl(ours.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(ours.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    Ok((r, w))
}

/// `fd`, moved to a number above 2 if it is not, and close-on-exec either way.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(fd);
    }
    // SAFETY: fcntl on a descriptor we own; it returns a new descriptor or -1.
    let moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if moved < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor from F_DUPFD_CLOEXEC, owned by nobody else (`fd` closes).
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

/// The job's three standard descriptors and our ends of them.
struct Stdio3 {
    /// The job's stdin: the read end of a pipe, or none for `/dev/null`.
    child_in: Option<OwnedFd>,
    child_out: OwnedFd,
    child_err: OwnedFd,
    ours: (Option<OwnedFd>, OwnedFd, OwnedFd),
}

impl Stdio3 {
    fn new(stdin: bool, live: bool) -> io::Result<Stdio3> {
        let (child_in, our_in) = match stdin {
            true => {
                let (r, w) = pipe(live, false)?;
                (Some(r), Some(w))
            }
            false => (None, None),
        };
        let (out_r, out_w) = pipe(true, true)?;
        let (err_r, err_w) = pipe(true, true)?;
        Ok(Stdio3 {
            child_in,
            child_out: out_w,
            child_err: err_w,
            ours: (our_in, out_r, err_r),
        })
    }

    fn into_process(self, pid: i32) -> Process {
        let (stdin, stdout, stderr) = self.ours;
        Process {
            pid,
            stdin,
            stdout,
            stderr: Some(stderr),
        }
    }
}

/// A new pseudo-terminal of `size`: the master (ours: non-blocking, close-on-exec) and
/// the slave (the job's: close-on-exec, not made anyone's controlling terminal here;
/// owned by the job user, if there is one).
fn open_pty(size: PtySize, user: Option<&JobUser>) -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: posix_openpt takes flags and returns a new descriptor or -1.
    let fd = unsafe { libc::posix_openpt(flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor from posix_openpt, owned by nobody else.
    let master = above_stdio(unsafe { OwnedFd::from_raw_fd(fd) })?;
    let m = master.as_raw_fd();
    // SAFETY: grantpt and unlockpt take the master's descriptor and pass no memory.
    if unsafe { libc::grantpt(m) } != 0 || unsafe { libc::unlockpt(m) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: `name` is writable for its length, which is passed.
        let r = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        // SAFETY: ptsname returns a pointer to a static NUL-terminated string or null;
        // it is copied at once (no other thread of this crate calls ptsname).
        let p = unsafe { libc::ptsname(m) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `p` is a NUL-terminated string (above).
        let bytes = unsafe { CStr::from_ptr(p) }.to_bytes_with_nul();
        if bytes.len() > name.len() {
            return Err(invalid("the terminal's name is too long".into()));
        }
        for (d, s) in name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
    }
    name[name.len() - 1] = 0;
    // SAFETY: `name` is NUL-terminated (its last element at least).
    let fd = unsafe { libc::open(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor from open, owned by nobody else.
    let slave = above_stdio(unsafe { OwnedFd::from_raw_fd(fd) })?;
    if let Some(user) = user {
        // The job user's own terminal (as a login's is): a program that opens it again
        // by its name (`tty`'s answer) is let in. Its group (tty) and mode stay.
        // SAFETY: fchown on a descriptor we own; no memory is passed.
        if unsafe { libc::fchown(slave.as_raw_fd(), user.uid, libc::gid_t::MAX) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    set_size(&master, size)?;
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    unsafe {
        let fl = libc::fcntl(m, libc::F_GETFL);
        libc::fcntl(m, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok((master, slave))
}

/// Sets a terminal's size (`TIOCSWINSZ`; on a master the kernel then sends SIGWINCH to
/// the terminal's foreground process group).
pub(crate) fn set_size(fd: &OwnedFd, size: PtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize`, which `ws` is, for its duration.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use super::*;
    use std::sync::OnceLock;

    type AddChdir =
        unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, *const libc::c_char) -> i32;
    type AddClosefrom = unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, i32) -> i32;

    /// The two file actions of glibc that `posix_spawn` needs here.
    pub(super) struct Actions {
        chdir: AddChdir,
        closefrom: AddClosefrom,
    }

    /// The file actions, if this glibc has them (looked up once).
    pub(super) fn actions() -> Option<&'static Actions> {
        static ACTIONS: OnceLock<Option<Actions>> = OnceLock::new();
        ACTIONS
            .get_or_init(|| {
                let find = |name: &CStr| {
                    // SAFETY: dlsym with the default handle and a NUL-terminated name.
                    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                    (!p.is_null()).then_some(p)
                };
                let chdir = find(c"posix_spawn_file_actions_addchdir_np")?;
                let closefrom = find(c"posix_spawn_file_actions_addclosefrom_np")?;
                // SAFETY: glibc declares these two functions with exactly these signatures
                // (spawn.h: `int f(posix_spawn_file_actions_t *, const char *)` and
                // `int f(posix_spawn_file_actions_t *, int)`).
                Some(unsafe {
                    Actions {
                        chdir: std::mem::transmute::<*mut libc::c_void, AddChdir>(chdir),
                        closefrom: std::mem::transmute::<*mut libc::c_void, AddClosefrom>(
                            closefrom,
                        ),
                    }
                })
            })
            .as_ref()
    }

    fn check(r: i32) -> io::Result<()> {
        match r {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Initialised file actions, destroyed on drop.
    struct FileActions(libc::posix_spawn_file_actions_t);

    impl Drop for FileActions {
        fn drop(&mut self) {
            // SAFETY: initialised by `posix_spawn_file_actions_init` in `spawn`.
            unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
        }
    }

    /// Initialised attributes, destroyed on drop.
    struct Attributes(libc::posix_spawnattr_t);

    impl Drop for Attributes {
        fn drop(&mut self) {
            // SAFETY: initialised by `posix_spawnattr_init` in `spawn`.
            unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
        }
    }

    pub(super) fn spawn(
        actions: &Actions,
        script: &CStr,
        launch: &Launch,
        env: &Env,
    ) -> io::Result<Process> {
        let dir = CString::new(launch.dir.as_os_str().as_bytes())
            .map_err(|_| invalid("a NUL byte in the job folder's path".into()))?;
        let stdio = Stdio3::new(launch.stdin, launch.live)?;
        let argv = bash_argv(script);
        let envp = env.pointers();

        // SAFETY: all-zero bytes are valid storage for the init call to fill.
        let mut fa = FileActions(unsafe { std::mem::zeroed() });
        // SAFETY: `fa.0` is writable storage; once this succeeds, `FileActions` destroys it.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut fa.0) })?;
        let fa_ptr: *mut libc::posix_spawn_file_actions_t = &mut fa.0;
        // SAFETY: `fa_ptr` points to initialised file actions; every path is a
        // NUL-terminated string, copied by glibc; the descriptors are open and owned by
        // `stdio` until after the spawn.
        unsafe {
            match &stdio.child_in {
                Some(r) => check(libc::posix_spawn_file_actions_adddup2(
                    fa_ptr,
                    r.as_raw_fd(),
                    0,
                ))?,
                None => check(libc::posix_spawn_file_actions_addopen(
                    fa_ptr,
                    0,
                    c"/dev/null".as_ptr(),
                    libc::O_RDONLY,
                    0,
                ))?,
            }
            check(libc::posix_spawn_file_actions_adddup2(
                fa_ptr,
                stdio.child_out.as_raw_fd(),
                1,
            ))?;
            check(libc::posix_spawn_file_actions_adddup2(
                fa_ptr,
                stdio.child_err.as_raw_fd(),
                2,
            ))?;
            check((actions.chdir)(fa_ptr, dir.as_ptr()))?;
            check((actions.closefrom)(fa_ptr, 3))?;
        }

        // SAFETY: all-zero bytes are valid storage for the init call to fill.
        let mut attr = Attributes(unsafe { std::mem::zeroed() });
        // SAFETY: `attr.0` is writable storage; once this succeeds, `Attributes` destroys it.
        check(unsafe { libc::posix_spawnattr_init(&mut attr.0) })?;
        // SAFETY: `attr.0` is initialised; the signal sets are local values filled by
        // sigemptyset and sigfillset before they are read.
        unsafe {
            let mut none: libc::sigset_t = std::mem::zeroed();
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigfillset(&mut all);
            check(libc::posix_spawnattr_setsigmask(&mut attr.0, &none))?;
            check(libc::posix_spawnattr_setsigdefault(&mut attr.0, &all))?;
            check(libc::posix_spawnattr_setpgroup(&mut attr.0, 0))?;
            let flags = libc::POSIX_SPAWN_SETPGROUP
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(
                &mut attr.0,
                flags as libc::c_short,
            ))?;
        }

        let mut pid: libc::pid_t = 0;
        // SAFETY: `pid` is writable; the file actions and attributes are initialised;
        // `argv` and `envp` are null-terminated arrays of NUL-terminated strings that
        // live (in `script`, `env` and static literals) until the call returns.
        check(unsafe {
            libc::posix_spawn(
                &mut pid,
                argv[0],
                &fa.0,
                &attr.0,
                argv.as_ptr() as *const *mut libc::c_char,
                envp.as_ptr() as *const *mut libc::c_char,
            )
        })?;
        Ok(stdio.into_process(pid))
    }
}

/// Starts the job with `fork`: std's `Command` forks (because of the hook), sets up
/// stdin, stdout and stderr, the folder and the process group, and reports a failed
/// `exec`; the hook (`before_exec`) ends with `execve` of the prepared arrays, so that
/// std never builds an environment of its own.
fn fork(launch: &Launch, script: CString, env: Env) -> io::Result<Process> {
    if let Some(size) = launch.pty {
        return fork_pty(launch, size, script, env);
    }
    let Stdio3 {
        child_in,
        child_out,
        child_err,
        ours,
    } = Stdio3::new(launch.stdin, launch.live)?;
    let mut cmd = Command::new(SHELL);
    cmd.current_dir(launch.dir)
        .stdin(child_in.map_or_else(Stdio::null, Stdio::from))
        .stdout(Stdio::from(child_out))
        .stderr(Stdio::from(child_err))
        .process_group(0);
    before_exec(&mut cmd, launch.user, false, Some(Exec::new(script, env)));
    let child = cmd.spawn()?;
    // Reaped by the caller through the pid (`wait`): dropping a `Child` neither waits
    // nor kills. Dropping `cmd` closes the job's ends of the pipes here.
    let pid = child.id() as i32;
    drop(child);
    drop(cmd);
    let (stdin, stdout, stderr) = ours;
    Ok(Process {
        pid,
        stdin,
        stdout,
        stderr: Some(stderr),
    })
}

/// A terminal job by `fork`: the slave on 0, 1 and 2; in the child, `setsid` and
/// `TIOCSCTTY` on 0 before `exec` (see `before_exec`); no `process_group` (a group
/// leader cannot `setsid`, and the new session is a new group anyway).
fn fork_pty(launch: &Launch, size: PtySize, script: CString, env: Env) -> io::Result<Process> {
    let (master, slave) = open_pty(size, launch.user)?;
    let input = master.try_clone()?;
    let mut cmd = Command::new(SHELL);
    cmd.current_dir(launch.dir)
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    before_exec(&mut cmd, launch.user, true, Some(Exec::new(script, env)));
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    drop(child);
    // The slave's last descriptor here closes: when the job's are closed too, reading
    // the master ends (EIO).
    drop(cmd);
    Ok(Process {
        pid,
        stdin: Some(input),
        stdout: master,
        stderr: None,
    })
}

/// For a command that is not a job (the job user's check at start): what a job's child
/// does before `exec`, as `user`, then std's `exec`.
pub(crate) fn prepare_as(cmd: &mut Command, user: &JobUser) {
    before_exec(cmd, Some(user), false, None);
}

/// `/bin/bash -c SCRIPT` as a null-terminated `argv` (pointing into `script`).
fn bash_argv(script: &CStr) -> [*const libc::c_char; 4] {
    [
        c"/bin/bash".as_ptr(),
        c"-c".as_ptr(),
        script.as_ptr(),
        std::ptr::null(),
    ]
}

/// `execve` of `/bin/bash -c SCRIPT` with a job's environment, the arrays built before
/// the fork (the child may not allocate).
struct Exec {
    argv: [*const libc::c_char; 4],
    envp: Vec<*const libc::c_char>,
    /// What the pointers point into.
    _script: CString,
    _env: Env,
}

// SAFETY: the pointers point into static literals and into the heap buffers of
// `_script` and `_env`, which the struct owns and never changes; nothing is mutable.
unsafe impl Send for Exec {}
// SAFETY: as above: the struct is never changed after `new`.
unsafe impl Sync for Exec {}

impl Exec {
    fn new(script: CString, env: Env) -> Exec {
        Exec {
            argv: bash_argv(&script),
            envp: env.pointers(),
            _script: script,
            _env: env,
        }
    }

    /// In the child: replaces the process, or says why it could not.
    fn exec(&self) -> io::Error {
        // SAFETY: `argv` and `envp` are null-terminated arrays of NUL-terminated strings
        // owned by `self` (see the struct).
        unsafe { libc::execve(self.argv[0], self.argv.as_ptr(), self.envp.as_ptr()) };
        io::Error::last_os_error()
    }
}

/// What the forked child does before `exec`, beyond what std does (SIGPIPE's disposition
/// reset): every descriptor from 3 up marked close-on-exec, the signal mask emptied (the
/// worker's threads block SIGPIPE, and std leaves the mask as it is), every other ignored
/// signal back to its default, with a job user that user's identity, and then `exec`,
/// if given (else std's own). With `terminal`, first a new session whose controlling
/// terminal is the one on descriptor 0 (std has put the slave on 0, 1 and 2 by then).
fn before_exec(cmd: &mut Command, user: Option<&JobUser>, terminal: bool, exec: Option<Exec>) {
    let ids = user.map(|u| (u.uid, u.gid));
    let fd_limit = fd_limit();
    let max_signal = libc::SIGRTMAX();
    // SAFETY: all-zero bytes are a valid `sigset_t`, then emptied by sigemptyset.
    let no_signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    };
    // SAFETY: the closure runs in the child between fork and exec. It makes only
    // async-signal-safe system calls (setsid, ioctl, close_range or fcntl, sigprocmask,
    // sigaction, setgroups, setgid, setuid, execve), allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            if terminal {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                #[allow(clippy::useless_conversion)]
                if libc::ioctl(0, libc::TIOCSCTTY.into(), 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            inherit_nothing(fd_limit);
            libc::pthread_sigmask(libc::SIG_SETMASK, &no_signals, std::ptr::null_mut());
            default_signals(max_signal);
            if let Some((uid, gid)) = ids {
                job_user::switch_to(uid, gid)?;
            }
            match &exec {
                Some(exec) => Err(exec.exec()),
                None => Ok(()),
            }
        })
    };
}

/// In the child before exec: puts back every signal that is ignored to its default (a
/// handled one is reset by `exec` itself). glibc's own two signals (32 and 33) refuse
/// with EINVAL and stay as they are (glibc's `posix_spawn` leaves them ignored, too).
fn default_signals(max_signal: libc::c_int) {
    for sig in 1..=max_signal {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: all-zero bytes are a valid `sigaction`; sigaction only reads and
        // writes these two locals.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
    }
}

/// Below what descriptor numbers `inherit_nothing` looks when the kernel lacks
/// `close_range` (Linux < 5.11): the descriptor limit, capped.
fn fd_limit() -> libc::c_int {
    // SAFETY: all-zero bytes are a valid `rlimit`, filled in by the call.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1 << 16;
    }
    lim.rlim_cur.min(1 << 20) as libc::c_int
}

/// In the child before exec: marks every descriptor from 3 up close-on-exec, so that the
/// job gets only 0, 1 and 2. (Marking rather than closing keeps std's close-on-exec pipe
/// that reports a failed exec working.)
fn inherit_nothing(fd_limit: libc::c_int) {
    #[cfg(target_os = "linux")]
    {
        let (first, last): (libc::c_uint, libc::c_uint) = (3, libc::c_uint::MAX);
        // SAFETY: a system call on integers.
        let r = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first,
                last,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if r == 0 {
            return;
        }
    }
    for fd in 3..fd_limit {
        // SAFETY: fcntl on a number that may or may not be an open descriptor (EBADF).
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Reaps a job's process (waiting for it to end).
pub(crate) fn wait(pid: i32) -> io::Result<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    loop {
        // SAFETY: `status` is a writable int; waitpid on a child of this process.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            return Ok(std::process::ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::process::ExitStatusExt;
    use std::path::PathBuf;

    /// The ways to start a job that this machine has: fork always, posix_spawn with a
    /// glibc that has the file actions.
    #[derive(Clone, Copy, Debug)]
    enum Way {
        Fork,
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        Spawn,
    }

    fn ways() -> Vec<Way> {
        #[allow(unused_mut)]
        let mut ways = vec![Way::Fork];
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if glibc::actions().is_some() {
            ways.push(Way::Spawn);
        }
        ways
    }

    fn start(way: Way, launch: &Launch, inherited: &[&str]) -> io::Result<Process> {
        let inherited = Environment {
            entries: inherited
                .iter()
                .map(|e| (CString::new(*e).unwrap(), e.find('=').unwrap()))
                .collect(),
        };
        let env = Env::new(Arc::new(inherited), launch)?;
        match way {
            Way::Fork => fork(launch, CString::new(launch.script).unwrap(), env),
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            Way::Spawn => {
                let script = CString::new(launch.script).unwrap();
                glibc::spawn(glibc::actions().unwrap(), &script, launch, &env)
            }
        }
    }

    fn read_all(fd: OwnedFd) -> Vec<u8> {
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
        let mut out = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut out).unwrap();
        out
    }

    /// Runs `script` to its end: its exit code, stdout, stderr.
    fn run(way: Way, launch: &Launch, inherited: &[&str], stdin: &[u8]) -> (i32, String, String) {
        let p = start(way, launch, inherited).unwrap();
        if let Some(fd) = p.stdin {
            std::fs::File::from(fd).write_all(stdin).unwrap();
        }
        let out = read_all(p.stdout);
        let err = read_all(p.stderr.unwrap());
        let status = wait(p.pid).unwrap();
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (
            status.code().unwrap_or(-status.signal().unwrap_or(0)),
            text(out),
            text(err),
        )
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("workpool-spawn-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn launch<'a>(script: &'a str, dir: &'a Path, vars: &'a [(&'a str, &'a str)]) -> Launch<'a> {
        Launch {
            script,
            dir,
            vars,
            stdin: false,
            live: false,
            pty: None,
            user: None,
        }
    }

    const PATH: &str = "PATH=/usr/local/bin:/usr/bin:/bin";

    #[test]
    fn a_job_gets_only_stdin_stdout_and_stderr_even_from_a_careless_host() {
        let dir = scratch("fds");
        // As a careless embedding program would: descriptors without close-on-exec.
        // SAFETY: a NUL-terminated path; the descriptors are closed below.
        let (fd, copy) = unsafe {
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
            (fd, libc::dup(fd))
        };
        assert!(fd > 2 && copy > 2, "open or dup failed");
        // SAFETY: fcntl on descriptors this test opened.
        let flags = unsafe {
            [
                libc::fcntl(fd, libc::F_GETFD),
                libc::fcntl(copy, libc::F_GETFD),
            ]
        };
        assert_eq!(flags, [0, 0], "they would be inherited");
        let script = "ls /proc/$$/fd > fds; echo $(cat fds)";
        let results: Vec<_> = ways()
            .into_iter()
            .map(|way| (way, run(way, &launch(script, &dir, &[]), &[PATH], b"")))
            .collect();
        // SAFETY: both are descriptors this test opened.
        unsafe {
            libc::close(fd);
            libc::close(copy);
        }
        for (way, (code, out, err)) in results {
            assert_eq!(
                (code, out.as_str(), err.as_str()),
                (0, "0 1 2\n", ""),
                "{way:?}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_job_starts_with_no_signal_blocked_or_ignored() {
        let dir = scratch("signals");
        // SIGPIPE is ignored in every Rust program; ignore SIGUSR2 too (process-wide; no
        // other test of this binary uses it), and block SIGUSR1 on this thread, which
        // spawns.
        // SAFETY: all-zero bytes are a valid `sigaction` and `sigset_t`; the calls read
        // and write only these locals.
        let old_usr2 = unsafe {
            let mut ign: libc::sigaction = std::mem::zeroed();
            ign.sa_sigaction = libc::SIG_IGN;
            let mut old: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(libc::SIGUSR2, &ign, &mut old), 0);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                0
            );
            old
        };
        // `exec`: bash puts back what it was given before it runs a program.
        let script = "exec grep -E '^Sig(Blk|Ign)' /proc/self/status";
        for way in ways() {
            let (code, out, _) = run(way, &launch(script, &dir, &[]), &[PATH], b"");
            assert_eq!(code, 0, "{way:?}");
            let mask = |name: &str| {
                let line = out.lines().find(|l| l.starts_with(name)).unwrap();
                u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
            };
            // Signals 32 and 33 (bits 31 and 32) belong to glibc, which no program
            // linked with it can use or reset; glibc's posix_spawn leaves them ignored.
            let glibc_own = 0b11 << 31;
            assert_eq!(mask("SigBlk:"), 0, "{way:?}: blocked in the job");
            assert_eq!(
                mask("SigIgn:") & !glibc_own,
                0,
                "{way:?}: ignored in the job"
            );
        }
        // SAFETY: as above; `old_usr2` is what sigaction returned.
        unsafe {
            libc::sigaction(libc::SIGUSR2, &old_usr2, std::ptr::null_mut());
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_job_gets_its_folder_and_the_inherited_environment_with_its_variables_over_it() {
        let dir = scratch("env");
        let vars = [("OVER", "new"), ("NEW", "x y=z"), ("OVER", "newer")];
        let inherited = [PATH, "KEEP=kept", "OVER=old", "EMPTY="];
        for way in ways() {
            let (code, out, _) = run(
                way,
                &launch("pwd; cat /proc/$$/environ", &dir, &vars),
                &inherited,
                b"",
            );
            assert_eq!(code, 0, "{way:?}");
            let (cwd, env) = out.split_once('\n').unwrap();
            assert_eq!(Path::new(cwd), dir, "{way:?}");
            // Less what bash sets for itself.
            let bash_own = |e: &&str| {
                ["PWD=", "SHLVL=", "_=", "OLDPWD="]
                    .iter()
                    .any(|p| e.starts_with(p))
            };
            let mut env: Vec<&str> = env
                .split('\0')
                .filter(|e| !e.is_empty() && !bash_own(e))
                .collect();
            env.sort();
            assert_eq!(
                env,
                ["EMPTY=", "KEEP=kept", "NEW=x y=z", "OVER=newer", PATH],
                "{way:?}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_job_user_s_home_and_name_come_first_and_the_job_may_override_them() {
        let user = JobUser {
            name: "someone".into(),
            uid: 12345,
            gid: 12345,
            home: "/home/someone".into(),
        };
        let vars = [("HOME", "/elsewhere")];
        let launch = Launch {
            user: Some(&user),
            ..launch("true", Path::new("/"), &vars)
        };
        let inherited = Environment {
            entries: vec![(c"HOME=/root".to_owned(), 4), (c"TERM=dumb".to_owned(), 4)],
        };
        let env = Env::new(Arc::new(inherited), &launch).unwrap();
        let entries: Vec<&CStr> = env.entries().collect();
        assert_eq!(
            entries,
            [
                c"TERM=dumb",
                c"HOME=/elsewhere",
                c"USER=someone",
                c"LOGNAME=someone"
            ]
        );
    }

    #[test]
    fn bad_names_and_nul_bytes_are_refused_with_a_reason() {
        let dir = Path::new("/");
        let refusal = |script: &str, vars: &[(&str, &str)]| {
            let err = match start(Way::Fork, &launch(script, dir, vars), &[]) {
                Ok(_) => panic!("{script:?} {vars:?} started"),
                Err(e) => e,
            };
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            err.to_string()
        };
        assert!(refusal("true", &[("A=B", "x")]).contains("not a valid environment variable name"));
        assert!(refusal("true", &[("", "x")]).contains("not a valid environment variable name"));
        assert!(refusal("true", &[("A", "x\0y")]).contains("the value of A contains a NUL byte"));
        let e = spawn(&launch("tr\0ue", dir, &[])).err().unwrap();
        assert!(
            e.to_string().contains("the script contains a NUL byte"),
            "{e}"
        );
    }

    #[test]
    fn stdin_is_the_pipe_when_asked_and_dev_null_otherwise() {
        let dir = scratch("stdin");
        for way in ways() {
            let piped = Launch {
                stdin: true,
                ..launch("tr a-z A-Z", &dir, &[])
            };
            let (code, out, _) = run(way, &piped, &[PATH], b"from stdin\n");
            assert_eq!((code, out.as_str()), (0, "FROM STDIN\n"), "{way:?}");
            let (code, out, _) = run(
                way,
                &launch("readlink /proc/$$/fd/0; cat", &dir, &[]),
                &[PATH],
                b"",
            );
            assert_eq!((code, out.as_str()), (0, "/dev/null\n"), "{way:?}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_job_leads_a_process_group_of_its_own_and_its_exit_is_reaped() {
        let dir = scratch("pgroup");
        for way in ways() {
            // Field 5 of /proc/PID/stat is the process group ("(bash)" has no spaces).
            let (code, out, _) = run(
                way,
                &launch("echo $$ $(cut -d' ' -f5 /proc/$$/stat); exit 7", &dir, &[]),
                &[PATH],
                b"",
            );
            assert_eq!(code, 7, "{way:?}");
            let ids: Vec<&str> = out.split_whitespace().collect();
            assert_eq!(ids.len(), 2, "{out}");
            assert_eq!(ids[0], ids[1], "{way:?}: not its own process group");
            // SAFETY: getpgrp has no preconditions.
            assert_ne!(ids[1], unsafe { libc::getpgrp() }.to_string());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_folder_that_is_gone_is_an_error() {
        for way in ways() {
            let gone = Path::new("/nonexistent/workpool-job");
            match start(way, &launch("true", gone, &[]), &[PATH]) {
                Ok(p) => panic!("{way:?}: started as {}", p.pid),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::NotFound, "{way:?}: {e}"),
            }
        }
    }

    /// glibc ≥ 2.34 has both file actions, so jobs start through posix_spawn there.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn posix_spawn_is_found_on_a_glibc_that_has_it() {
        // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
        let version = unsafe { CStr::from_ptr(gnu_get_libc_version()) };
        let version = version.to_str().unwrap();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        assert_eq!(
            glibc::actions().is_some(),
            (major, minor) >= (2, 34),
            "glibc {version}"
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe extern "C" {
        fn gnu_get_libc_version() -> *const libc::c_char;
    }
}
