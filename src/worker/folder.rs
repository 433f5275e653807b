//! Job folders, handled through descriptors so that nothing a job plants is followed.
//!
//! A job may leave symlinks (to `/etc`, to another user's files) in its folder, swap a
//! subfolder for a symlink while the folder is being deleted, take permissions away from
//! its subfolders, or, running as another user, make look-alike folders in the work dir.
//! So every folder is opened with `O_NOFOLLOW | O_DIRECTORY` relative to the descriptor
//! of its parent and judged by `fstat` on the descriptor just opened (owner, identity,
//! file system); its entries are removed with `unlinkat` relative to that descriptor, and
//! a permission is given back with `fchmod` on it. No call takes a path that was checked
//! a moment before, a symlink is removed and never entered, and removal never enters
//! another file system mounted inside.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Below this depth a folder is moved up into the top folder instead of entered, so
/// that removing a deep tree holds a bounded number of descriptors (and stack frames).
const MAX_DEPTH: usize = 64;

/// How often a folder is listed again while entries keep appearing in it (made by a
/// process of the job that escaped every kill) before removal gives up.
const ROUNDS: usize = 1000;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn errno_is(e: &io::Error, codes: &[libc::c_int]) -> bool {
    e.raw_os_error().is_some_and(|c| codes.contains(&c))
}

/// A path or name as a C string.
pub(crate) fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
}

fn own(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by a successful open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a folder given by path (the work dir: configuration, so symlinks in it are
/// followed).
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = c_string(path.as_os_str())?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    own(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })
}

fn openat_dir(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `dir` is an open descriptor and `name` a NUL-terminated string.
    own(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
}

/// Opens the folder `name` in `dir`, never through a symlink (ELOOP or ENOTDIR then).
/// A folder whose owner took away its read permission is given it back first: only an
/// unprivileged worker meets one (root may open any folder), and it can change only its
/// own files; `AT_SYMLINK_NOFOLLOW` never changes what a symlink points to.
fn open_dir_at(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
    match openat_dir(dir, name) {
        Err(e) if errno_is(&e, &[libc::EACCES]) => {
            // SAFETY: `dir` is an open descriptor and `name` a NUL-terminated string.
            let r = unsafe {
                libc::fchmodat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    0o700,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if r != 0 {
                return Err(e);
            }
            openat_dir(dir, name)
        }
        r => r,
    }
}

/// `fstat` of an open descriptor.
pub(crate) fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: all-zero bytes are a valid `stat` (plain integers), filled in by the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is a valid, writable `stat`.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `lstat` of `name` in `dir`: what the entry itself is.
fn lstat_at(dir: &OwnedFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: all-zero bytes are a valid `stat` (plain integers), filled in by the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is open, `name` NUL-terminated, `st` valid and writable.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// The names in a folder (without `.` and `..`).
pub(crate) fn list(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    // A description of its own, so that its read position starts at the beginning.
    let fd = openat_dir(dir, c".")?;
    // SAFETY: `fd` is an open folder; on success the stream owns it (closed by closedir).
    let stream = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error()); // `fd` is closed on return
    }
    let _ = fd.into_raw_fd();
    let mut names = Vec::new();
    loop {
        // SAFETY: `stream` is an open directory stream used by this thread only.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        // SAFETY: `d_name` of an entry returned by readdir is NUL-terminated, valid until
        // the next readdir on the stream; it is copied before that.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    // SAFETY: `stream` came from fdopendir and is closed once.
    unsafe { libc::closedir(stream) };
    Ok(names)
}

/// Makes the folder `name` in `dir` with mode 0700 (failing if anything has that name,
/// so that nothing planted is reused) and hands it to `owner` (uid, gid) if given.
/// Returns its (device, inode), which tell it apart later from anything put in its place.
pub(crate) fn make_private_dir(
    dir: &OwnedFd,
    name: &CStr,
    owner: Option<(libc::uid_t, libc::gid_t)>,
) -> io::Result<(libc::dev_t, libc::ino_t)> {
    // SAFETY: `dir` is open and `name` NUL-terminated.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) })?;
    let made = (|| {
        let fd = openat_dir(dir, name)?;
        // Whatever the umask, and before anyone else owns it.
        // SAFETY: `fd` is an open folder.
        cvt(unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) })?;
        if let Some((uid, gid)) = owner {
            // SAFETY: `fd` is an open folder.
            cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
        }
        let st = fstat(&fd)?;
        Ok((st.st_dev, st.st_ino))
    })();
    if made.is_err() {
        // SAFETY: `dir` is open and `name` NUL-terminated.
        unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
    }
    made
}

/// What [`remove_tree`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Removal {
    /// The folder and everything in it are gone.
    Removed,
    /// Nothing has that name.
    Gone,
    /// Not a folder (a symlink, a file): left alone.
    NotAFolder,
    /// A folder the caller's check refused (it belongs to this user): left alone.
    Refused { owner: libc::uid_t },
}

/// Removes the folder `name` in `dir` and everything in it, if `accept` approves of the
/// folder as opened (its `fstat`). Symlinks inside are removed, never followed; a file
/// system mounted inside is not entered (an error); a folder of this process's user that
/// lacks permissions is given `rwx` for its owner first.
pub(crate) fn remove_tree(
    dir: &OwnedFd,
    name: &CStr,
    accept: impl Fn(&libc::stat) -> bool,
) -> io::Result<Removal> {
    let top = match open_dir_at(dir, name) {
        Ok(fd) => fd,
        Err(e) if errno_is(&e, &[libc::ENOENT]) => return Ok(Removal::Gone),
        Err(e) if errno_is(&e, &[libc::ELOOP, libc::ENOTDIR, libc::EMLINK]) => {
            return Ok(Removal::NotAFolder);
        }
        Err(e) => return Err(e),
    };
    let st = fstat(&top)?;
    if !accept(&st) {
        return Ok(Removal::Refused { owner: st.st_uid });
    }
    if st.st_dev != fstat(dir)?.st_dev {
        return Err(mounted());
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut walk = Walk {
        top: &top,
        dev: st.st_dev,
        me,
        moved: 0,
    };
    walk.give_back(&top, &st)?;
    walk.empty(&top, 0)?;
    drop(top);
    unlink(dir, name, libc::AT_REMOVEDIR)?;
    Ok(Removal::Removed)
}

fn mounted() -> io::Error {
    io::Error::other("another file system is mounted inside; it was not entered")
}

/// `unlinkat`; an entry already gone is fine.
fn unlink(dir: &OwnedFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `dir` is open and `name` NUL-terminated.
    match cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }) {
        Err(e) if !errno_is(&e, &[libc::ENOENT]) => Err(e),
        _ => Ok(()),
    }
}

/// An entry that changed kind (or filled up) between being looked at and being removed
/// was swapped by a process of the job: the next round of `empty` takes it as it is now.
fn swapped_is_fine(r: io::Result<()>, changed_kind: libc::c_int) -> io::Result<()> {
    match r {
        Err(e) if errno_is(&e, &[changed_kind, libc::ENOTEMPTY, libc::EEXIST]) => Ok(()),
        r => r,
    }
}

struct Walk<'a> {
    /// The folder being removed; deep subfolders are moved up into it.
    top: &'a OwnedFd,
    /// Its file system: nothing on another one is entered.
    dev: libc::dev_t,
    /// This process's effective user: only its own folders get permissions back.
    me: libc::uid_t,
    /// Numbers the names of folders moved up.
    moved: u64,
}

impl Walk<'_> {
    /// Gives the owner `rwx` on an open folder of this process's user that lacks it, so
    /// that its entries can be listed and removed.
    fn give_back(&self, fd: &OwnedFd, st: &libc::stat) -> io::Result<()> {
        if st.st_uid == self.me && st.st_mode & 0o700 != 0o700 {
            // SAFETY: `fd` is an open folder.
            cvt(unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) })?;
        }
        Ok(())
    }

    /// Removes everything in the open folder `dir`, `depth` levels below the top.
    fn empty(&mut self, dir: &OwnedFd, depth: usize) -> io::Result<()> {
        for _ in 0..ROUNDS {
            let names = list(dir)?;
            if names.is_empty() {
                return Ok(());
            }
            for name in &names {
                self.remove_entry(dir, name, depth)?;
            }
        }
        Err(io::Error::other(
            "new entries kept appearing while it was being deleted",
        ))
    }

    fn remove_entry(&mut self, dir: &OwnedFd, name: &CStr, depth: usize) -> io::Result<()> {
        let st = match lstat_at(dir, name) {
            Ok(st) => st,
            Err(e) if errno_is(&e, &[libc::ENOENT]) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !is_dir(&st) {
            return swapped_is_fine(unlink(dir, name, 0), libc::EISDIR);
        }
        if st.st_dev != self.dev {
            return Err(mounted());
        }
        if depth + 1 >= MAX_DEPTH {
            return self.move_up(dir, name);
        }
        let sub = match open_dir_at(dir, name) {
            Ok(fd) => fd,
            Err(e) if errno_is(&e, &[libc::ENOENT]) => return Ok(()),
            // Swapped for a symlink (or a file) since the lstat: remove that, not its target.
            Err(e) if errno_is(&e, &[libc::ELOOP, libc::ENOTDIR, libc::EMLINK]) => {
                return swapped_is_fine(unlink(dir, name, 0), libc::EISDIR);
            }
            Err(e) => return Err(e),
        };
        let st = fstat(&sub)?; // what was really opened
        if st.st_dev != self.dev {
            return Err(mounted());
        }
        self.give_back(&sub, &st)?;
        self.empty(&sub, depth + 1)?;
        drop(sub);
        let removed = unlink(dir, name, libc::AT_REMOVEDIR);
        swapped_is_fine(removed, libc::ENOTDIR)
    }

    /// Moves a folder too deep to enter up into the top folder (on the same file system:
    /// `renameat` moves the entry itself, whatever it is), where a later round takes it.
    fn move_up(&mut self, dir: &OwnedFd, name: &CStr) -> io::Result<()> {
        let mut last = None;
        for _ in 0..16 {
            self.moved += 1;
            let to =
                CString::new(format!(".workpool-deep-{}", self.moved)).map_err(io::Error::other)?;
            // SAFETY: both descriptors are open and both names NUL-terminated.
            let r = unsafe {
                libc::renameat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    self.top.as_raw_fd(),
                    to.as_ptr(),
                )
            };
            match cvt(r) {
                Ok(_) => return Ok(()),
                Err(e) if errno_is(&e, &[libc::ENOENT]) => return Ok(()),
                Err(e) if errno_is(&e, &[libc::EEXIST, libc::ENOTEMPTY]) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free name to move a folder to")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("workpool-folder-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_made_folder_is_private_and_never_reuses_a_name() {
        let base = scratch("make");
        let wd = open_dir(&base).unwrap();
        let id = make_private_dir(&wd, c"job", None).unwrap();
        assert_eq!(mode(&base.join("job")), 0o700);
        let st = std::fs::metadata(base.join("job")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((st.dev(), st.ino()), (id.0, id.1));
        // Anything already there, a symlink included, makes it fail.
        symlink(&base, base.join("planted")).unwrap();
        for name in [c"job", c"planted"] {
            let e = make_private_dir(&wd, name, None).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{name:?}");
        }
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_deep_tree_is_removed_with_a_bounded_number_of_descriptors() {
        let base = scratch("deep");
        let mut p = base.join("top");
        for _ in 0..(3 * MAX_DEPTH + 5) {
            p = p.join("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("f"), "x").unwrap();
        let wd = open_dir(&base).unwrap();
        assert_eq!(
            remove_tree(&wd, c"top", |_| true).unwrap(),
            Removal::Removed
        );
        assert!(!base.join("top").exists());
        std::fs::remove_dir_all(base).unwrap();
    }

    /// Removing a job's folder is the deepest thing a job thread does: a tree deeper than
    /// the recursion limit, removed on a thread with a job thread's stack (an overflow
    /// aborts the test). Prints how much of the stack it touched.
    #[test]
    fn a_deep_tree_is_removed_on_a_job_threads_stack() {
        let base = scratch("deep-on-job-stack");
        let mut p = base.join("top");
        for _ in 0..(3 * MAX_DEPTH + 5) {
            p = p.join("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("f"), "x").unwrap();
        let b = base.clone();
        let (removal, (reserved, touched)) = crate::thread::for_job("wp-job-test", move || {
            let wd = open_dir(&b).unwrap();
            let r = remove_tree(&wd, c"top", |_| true).unwrap();
            (r, crate::thread::stack_use_here())
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(removal, Removal::Removed);
        assert!(!base.join("top").exists());
        eprintln!(
            "deep removal: {} KiB touched of a {} KiB stack",
            touched >> 10,
            reserved >> 10
        );
        std::fs::remove_dir_all(base).unwrap();
    }

    /// A process of the job swaps a subfolder (holding a folder locked with mode 000) and
    /// a symlink to a folder outside, back and forth, while the job's folder is deleted,
    /// `rounds` times: the delete never goes through the link (the folder outside keeps
    /// its files and modes, its locked subfolder stays locked). Also run by an
    /// unprivileged user (`executor::tests`), where permissions must be given back.
    #[cfg(target_os = "linux")]
    pub(crate) fn delete_while_swapping(base: &Path, rounds: usize) {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let set_mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let outside = base.join("outside");
        std::fs::create_dir_all(outside.join("inner")).unwrap();
        std::fs::create_dir_all(outside.join("locked")).unwrap();
        for i in 0..20 {
            std::fs::write(outside.join(format!("keep-{i}")), "x").unwrap();
            std::fs::write(outside.join(format!("inner/keep-{i}")), "x").unwrap();
        }
        set_mode(&outside.join("locked"), 0o000);
        set_mode(&outside, 0o500);
        let wd = open_dir(base).unwrap();
        let swaps = Arc::new(AtomicU64::new(0));
        for round in 0..rounds {
            let top = base.join("top");
            std::fs::create_dir_all(top.join("sub/inner")).unwrap();
            std::fs::create_dir_all(top.join("sub/locked")).unwrap();
            for i in 0..20 {
                std::fs::write(top.join(format!("sub/f-{i}")), "x").unwrap();
                std::fs::write(top.join(format!("sub/inner/f-{i}")), "x").unwrap();
            }
            set_mode(&top.join("sub/locked"), 0o000);
            symlink(&outside, top.join("alt")).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let (a, b) = (
                c_string(top.join("sub").as_os_str()).unwrap(),
                c_string(top.join("alt").as_os_str()).unwrap(),
            );
            let (st, sw) = (stop.clone(), swaps.clone());
            let swapper = std::thread::spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    // SAFETY: two NUL-terminated paths.
                    let r = unsafe {
                        libc::renameat2(
                            libc::AT_FDCWD,
                            a.as_ptr(),
                            libc::AT_FDCWD,
                            b.as_ptr(),
                            libc::RENAME_EXCHANGE,
                        )
                    };
                    if r == 0 {
                        sw.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            let removed = remove_tree(&wd, c"top", |_| true);
            stop.store(true, Ordering::Relaxed);
            swapper.join().unwrap();
            assert_eq!(removed.unwrap(), Removal::Removed, "round {round}");
            assert_eq!(
                mode(&outside),
                0o500,
                "round {round}: outside's mode changed"
            );
            assert_eq!(
                mode(&outside.join("locked")),
                0o000,
                "round {round}: outside/locked was opened up"
            );
            for i in 0..20 {
                assert!(outside.join(format!("keep-{i}")).exists(), "round {round}");
                assert!(
                    outside.join(format!("inner/keep-{i}")).exists(),
                    "round {round}"
                );
            }
        }
        assert!(
            swaps.load(Ordering::Relaxed) > 0,
            "the swapper never swapped"
        );
        set_mode(&outside, 0o700);
        set_mode(&outside.join("locked"), 0o700);
        std::fs::remove_dir_all(outside).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_subfolder_swapped_for_a_symlink_during_the_delete_is_not_followed() {
        let base = scratch("swap");
        delete_while_swapping(&base, 100);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_symlink_or_a_refused_folder_is_left_alone() {
        let base = scratch("leave");
        let outside = base.join("outside");
        std::fs::create_dir_all(outside.join("keep")).unwrap();
        symlink(&outside, base.join("link")).unwrap();
        let wd = open_dir(&base).unwrap();
        assert_eq!(
            remove_tree(&wd, c"link", |_| true).unwrap(),
            Removal::NotAFolder
        );
        assert_eq!(remove_tree(&wd, c"none", |_| true).unwrap(), Removal::Gone);
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(
            remove_tree(&wd, c"outside", |_| false).unwrap(),
            Removal::Refused { owner: me }
        );
        assert!(outside.join("keep").is_dir());
        std::fs::remove_dir_all(base).unwrap();
    }
}
