//! The user jobs run as (`WorkerConfig::job_user`): looked up when the worker starts,
//! taken on in each job's process between `fork` and `exec`.

use crate::error::{Error, Result};
use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::unix::ffi::OsStringExt;

/// A user from the password database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct JobUser {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub home: OsString,
}

impl JobUser {
    /// Checks that this process may run jobs as `name` (it runs as root; the user exists
    /// and is not root) and looks the user up.
    pub(crate) fn resolve(name: &str) -> Result<JobUser> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return bad(format!(
                "job_user {name:?}: running jobs as another user needs a worker started as root \
                 (this one runs as uid {euid})"
            ));
        }
        let Some(user) = lookup(name)? else {
            return bad(format!(
                "job_user {name:?}: there is no such user on this machine"
            ));
        };
        if user.uid == 0 {
            return bad(format!(
                "job_user {name:?} is root (uid 0): its jobs could read the worker's key; \
                 name an unprivileged user"
            ));
        }
        Ok(user)
    }
}

/// `getpwnam_r`: the user called `name`, if there is one.
pub(crate) fn lookup(name: &str) -> Result<Option<JobUser>> {
    let c_name = CString::new(name)
        .map_err(|_| Error::InvalidConfig(format!("job_user {name:?} holds a NUL byte")))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: all-zero bytes are a valid `passwd` (integers and null pointers).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the name is NUL-terminated, `pwd`
        // and `found` are writable, and `buf` has `buf.len()` writable bytes.
        let r = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr() as *mut libc::c_char,
                buf.len(),
                &mut found,
            )
        };
        if r == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 {
            return Err(Error::io(
                format!("looking up the user {name:?}"),
                io::Error::from_raw_os_error(r),
            ));
        }
        if found.is_null() {
            return Ok(None);
        }
        let home = if pwd.pw_dir.is_null() {
            OsString::from("/")
        } else {
            // SAFETY: `pw_dir` points to a NUL-terminated string inside `buf`, alive here.
            OsString::from_vec(unsafe { CStr::from_ptr(pwd.pw_dir) }.to_bytes().to_vec())
        };
        return Ok(Some(JobUser {
            name: name.to_string(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home,
        }));
    }
}

/// In a job's process between `fork` and `exec`: leaves every supplementary group, then
/// takes the user's primary group and the user (real, effective and saved ids, so there
/// is no way back). Async-signal-safe: three system calls, no allocation.
pub(crate) fn switch_to(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: setgroups with a count of 0 reads no list.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a system call on an integer.
    if unsafe { libc::setgid(gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a system call on an integer.
    if unsafe { libc::setuid(uid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_and_a_missing_user_is_not() {
        let root = lookup("root").unwrap().expect("every system has root");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(lookup("no-such-user-for-workpool").unwrap().is_none());
    }

    #[test]
    fn root_an_unknown_user_or_an_unprivileged_worker_is_refused_with_a_reason() {
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let msg = |name: &str| JobUser::resolve(name).unwrap_err().to_string();
        if as_root {
            assert!(msg("root").contains("is root (uid 0)"), "{}", msg("root"));
            let m = msg("no-such-user-for-workpool");
            assert!(m.contains("there is no such user"), "{m}");
        } else {
            let m = msg("nobody");
            assert!(m.contains("needs a worker started as root"), "{m}");
        }
    }
}
