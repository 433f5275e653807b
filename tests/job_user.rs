//! What a job can reach of its worker: with a job user (the worker runs as root, as in
//! CI) jobs run as that user, cannot read the worker's key, and own their folder; their
//! processes are still all found and killed; and no job inherits a descriptor of the
//! program that embeds the worker beyond stdin, stdout and stderr.

mod common;

use common::*;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use workpool::job::{JobEvent, JobSpec, Outcome};
use workpool::worker::Worker;

/// `id -u NAME` and `id -g NAME`.
fn ids_of(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        assert!(out.status.success(), "id {flag} {user} failed");
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    (id("-u"), id("-g"))
}

/// Writes the certificates like `generate-tls-certificates` does: keys with mode 0600.
fn write_certs(certs: &Certs, dir: &Path) {
    certs.write_to(dir);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with("-key.pem") {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

/// Gone, or a zombie (dead, waiting to be reaped by someone else).
fn dead(pid: i32) -> bool {
    !alive(pid)
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
            .unwrap_or(true)
}

/// The real uid of a process.
fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_job_runs_as_the_job_user_and_cannot_read_the_worker_key_or_other_users_files() {
    if !root_or_skip("a_job_runs_as_the_job_user_and_cannot_read_the_worker_key") {
        return;
    }
    let dir = scratch("job-user");
    let c = Cluster::with(1, |_, cfg| cfg.job_user("nobody"));
    write_certs(&c.certs, &dir);
    let key = dir.join("worker-0-key.pem");
    // Root's private folder, with a file that is readable to all by its own mode.
    let private = dir.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(private.join("notes"), "root's").unwrap();
    std::fs::set_permissions(
        private.join("notes"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .contains("PRIVATE KEY")
    );
    let script = format!(
        "echo uid $(id -u) gid $(id -g) groups $(id -G)\n\
         echo folder $(stat -c %u:%g:%a .) at $PWD\n\
         echo home $HOME user $USER\n\
         cat {key} > /dev/null 2>&1 && echo key readable || echo key unreadable\n\
         cat {notes} > /dev/null 2>&1 && echo notes readable || echo notes unreadable\n\
         echo mine > mine && echo wrote $(cat mine)\n",
        key = key.display(),
        notes = private.join("notes").display()
    );
    let r = run(&c.manager, JobSpec::new(script));
    let out = r.stdout_text();
    assert_eq!(
        r.outcome,
        Outcome::Exited(0),
        "{out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let (uid, gid) = ids_of("nobody");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!("uid {uid} gid {gid} groups {gid}"),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&format!("folder {uid}:{gid}:700 at ")),
        "{out}"
    );
    let home = String::from_utf8(
        Command::new("sh")
            .args(["-c", "getent passwd nobody | cut -d: -f6"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(
        lines[2],
        format!("home {} user nobody", home.trim()),
        "{out}"
    );
    assert_eq!(
        &lines[3..],
        ["key unreadable", "notes unreadable", "wrote mine"]
    );
    // The folder goes right after the job.
    let folder = lines[1].rsplit(" at ").next().unwrap();
    assert!(folder.contains("workpool-job-"), "{out}");
    wait_until(&format!("{folder} to be deleted"), || {
        !Path::new(folder).exists()
    });
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_process_of_a_job_user_job_is_found_and_killed() {
    if !root_or_skip("every_process_of_a_job_user_job_is_found_and_killed") {
        return;
    }
    let c = Cluster::with(1, |_, cfg| cfg.job_user("nobody"));
    let (uid, _) = ids_of("nobody");
    // One process in a session of its own (found by its token), the shell itself.
    let h = c
        .manager
        .submit(JobSpec::new(
            "setsid sleep 600 > /dev/null 2>&1 & echo $! $$ ready; sleep 600",
        ))
        .unwrap();
    let mut text = String::new();
    while !text.contains("ready") {
        match next_event(h.events()) {
            JobEvent::Output { bytes, .. } => text.push_str(&String::from_utf8_lossy(&bytes)),
            JobEvent::Finished(o) => panic!("ended before it was ready: {o}"),
            _ => {}
        }
    }
    let pids: Vec<i32> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{text}");
    for &pid in &pids {
        assert_eq!(uid_of(pid), uid, "process {pid} does not run as nobody");
    }
    h.cancel().unwrap();
    assert_eq!(h.wait().outcome, Outcome::Cancelled);
    for pid in pids {
        wait_until(&format!("process {pid} of the job is dead"), || dead(pid));
    }
    // What a script that exits leaves running is killed too.
    let r = run(
        &c.manager,
        JobSpec::new("setsid sleep 600 > /dev/null 2>&1 & echo $!"),
    );
    assert_eq!(r.outcome, Outcome::Exited(0));
    let pid: i32 = r.stdout_text().trim().parse().unwrap();
    wait_until(&format!("leftover {pid} is dead"), || dead(pid));
}

#[test]
fn a_job_user_needs_a_root_worker_and_a_user_that_exists() {
    let certs = Certs::new(1);
    let config = |user: &str| certs.worker_config(free_port(), 0, "w").job_user(user);
    let refusal = |user: &str| match Worker::start(config(user)) {
        Ok(_) => panic!("a worker with job_user {user:?} started"),
        Err(e) => e.to_string(),
    };
    // A copy of the CLI that nobody may run wherever the build is.
    let bin = scratch("job-user-cli");
    std::fs::copy(cli(), bin.join("workpool")).unwrap();
    let cli_refusal = |user: &str, as_nobody: bool| {
        let mut cmd = Command::new(bin.join("workpool"));
        cmd.args([
            "worker",
            "--insecure-plaintext",
            "-p",
            "1",
            "--job-user",
            user,
        ]);
        if as_nobody {
            let (uid, gid) = ids_of("nobody");
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let unprivileged = "needs a worker started as root";
    if running_as_root() {
        let m = refusal("no-such-user-for-workpool");
        assert!(m.contains("there is no such user"), "{m}");
        let m = refusal("root");
        assert!(m.contains("is root (uid 0)"), "{m}");
        let m = cli_refusal("no-such-user-for-workpool", false);
        assert!(m.contains("there is no such user"), "{m}");
        // A work dir the job user cannot enter.
        let closed = scratch("job-user-closed");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut cfg = config("nobody");
        cfg.work_dir = closed.clone();
        let m = match Worker::start(cfg) {
            Ok(_) => panic!("a worker started with a work dir its job user cannot enter"),
            Err(e) => e.to_string(),
        };
        assert!(m.contains("cannot enter the work dir"), "{m}");
        std::fs::remove_dir(closed).unwrap();
        // The CLI started as an unprivileged user.
        let m = cli_refusal("nobody", true);
        assert!(m.contains(unprivileged), "{m}");
        // And through the C ABI.
        let dir = scratch("job-user-ffi");
        write_certs(&certs, &dir);
        let text = |s: &str| CString::new(s).unwrap();
        let f = |n: &str| text(&dir.join(n).display().to_string());
        use workpool::ffi::*;
        // SAFETY: every pointer is valid (strings outlive the calls, the config is freed once).
        unsafe {
            let mut wc = std::ptr::null_mut();
            assert_eq!(wp_worker_config_new(&mut wc), wp_result::WP_RESULT_OK);
            let host = text("127.0.0.1");
            wp_worker_config_set_manager(wc, host.as_ptr(), free_port());
            let (cert, key) = (f("worker-0-cert.pem"), f("worker-0-key.pem"));
            wp_worker_config_set_identity_pem_files(wc, cert.as_ptr(), key.as_ptr());
            let root = f("host-cert.pem");
            wp_worker_config_add_manager_root_pem_file(wc, root.as_ptr());
            let user = text("no-such-user-for-workpool");
            assert_eq!(
                wp_worker_config_set_job_user(wc, user.as_ptr()),
                wp_result::WP_RESULT_OK
            );
            let mut worker = std::ptr::null_mut();
            assert_eq!(
                wp_worker_start(wc, &mut worker),
                wp_result::WP_RESULT_INVALID_ARGUMENT
            );
            assert!(worker.is_null());
            let mut buf = [0u8; 512];
            let n = wp_last_error_message(buf.as_mut_ptr() as *mut _, buf.len());
            let msg = String::from_utf8_lossy(&buf[..n.min(511)]).into_owned();
            assert!(msg.contains("there is no such user"), "{msg}");
            wp_worker_config_free(wc);
        }
        std::fs::remove_dir_all(dir).unwrap();
    } else {
        let m = refusal("nobody");
        assert!(m.contains(unprivileged), "{m}");
        let m = cli_refusal("nobody", false);
        assert!(m.contains(unprivileged), "{m}");
    }
    std::fs::remove_dir_all(bin).unwrap();
}

#[test]
fn a_job_inherits_no_descriptor_beyond_stdin_stdout_stderr() {
    let dir = scratch("inherit");
    let c = Cluster::new(1);
    write_certs(&c.certs, &dir);
    // As a careless embedding program would: descriptors without O_CLOEXEC, one of them
    // on the worker's key.
    let key = CString::new(dir.join("worker-0-key.pem").display().to_string()).unwrap();
    // SAFETY: `key` is a NUL-terminated path; the descriptors are closed below.
    let (fd, copy) = unsafe {
        let fd = libc::open(key.as_ptr(), libc::O_RDONLY);
        (fd, libc::dup(fd))
    };
    assert!(fd > 2 && copy > 2, "open or dup failed");
    // `ls` lists the shell's descriptors (its own directory handle is its own).
    let r = run(
        &c.manager,
        JobSpec::new("ls /proc/$$/fd > fds; echo $(cat fds)"),
    );
    // SAFETY: both are descriptors this test opened.
    unsafe {
        libc::close(fd);
        libc::close(copy);
    }
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(r.stdout_text(), "0 1 2\n");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_job_user_s_terminal_job_owns_its_terminal_and_can_open_it_by_name() {
    if !root_or_skip("a_job_user_s_terminal_job_owns_its_terminal_and_can_open_it_by_name") {
        return;
    }
    let c = Cluster::with(1, |_, cfg| cfg.job_user("nobody"));
    let (uid, _) = ids_of("nobody");
    // As `screen`, `mesg` or a pinentry do: the terminal opened again by its name.
    let r = run(
        &c.manager,
        JobSpec::new(
            "t=$(tty); echo owner $(stat -c %u $t); \
             (exec 3<>\"$t\") 2>/dev/null && echo opened || echo refused",
        )
        .pty(24, 80),
    );
    assert_eq!(r.outcome, Outcome::Exited(0));
    let out = r.stdout_text();
    assert!(out.contains(&format!("owner {uid}\r\n")), "{out:?}");
    assert!(out.contains("opened"), "{out:?}");
}
