//! The C ABI: the committed header matches the generated one, the C example programs
//! compile with `-Wall -Wextra -Werror` against the static library and run on loopback
//! with real TLS (and clean under valgrind), and every entry point copes with NULL,
//! bad text and panics.

mod common;

use common::*;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr;
use workpool::ffi::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_committed_header_is_the_generated_one() {
    let generated = Path::new(env!("OUT_DIR")).join("workpool.h");
    let committed = root().join("include/workpool.h");
    let (g, c) = (
        std::fs::read_to_string(&generated).unwrap(),
        std::fs::read_to_string(&committed).unwrap(),
    );
    assert!(
        g == c,
        "include/workpool.h is stale; fix: cp {} {}",
        generated.display(),
        committed.display()
    );
}

/// A manager started through the C ABI with the given admission settings.
unsafe fn admission_manager(
    dir: &Path,
    timeout_ms: u64,
    max: u32,
    per_source: u32,
) -> *mut wp_manager {
    use wp_result::*;
    let path = |p: &str| CString::new(dir.join(p).to_str().unwrap()).unwrap();
    let listen = CString::new("127.0.0.1:0").unwrap();
    // SAFETY: every pointer passed is a live CString, a live local, or a handle returned
    // by the library and freed once.
    unsafe {
        let mut mc = ptr::null_mut();
        assert_eq!(wp_manager_config_new(&mut mc), WP_RESULT_OK);
        assert_eq!(
            wp_manager_config_set_listen(mc, listen.as_ptr()),
            WP_RESULT_OK
        );
        let (cert, key) = (path("host-cert.pem"), path("host-key.pem"));
        assert_eq!(
            wp_manager_config_set_identity_pem_files(mc, cert.as_ptr(), key.as_ptr()),
            WP_RESULT_OK
        );
        let root = path("worker-0-cert.pem");
        assert_eq!(
            wp_manager_config_add_worker_root_pem_file(mc, root.as_ptr()),
            WP_RESULT_OK
        );
        assert_eq!(
            wp_manager_config_set_handshake_timeout_ms(mc, timeout_ms),
            WP_RESULT_OK
        );
        assert_eq!(wp_manager_config_set_max_handshakes(mc, max), WP_RESULT_OK);
        assert_eq!(
            wp_manager_config_set_max_handshakes_per_source(mc, per_source),
            WP_RESULT_OK
        );
        let mut m = ptr::null_mut();
        assert_eq!(wp_manager_start(mc, &mut m), WP_RESULT_OK);
        wp_manager_config_free(mc);
        m
    }
}

/// Whether the manager cuts `s` before `within` passes (rather than leave it waiting).
fn cut_within(s: &mut std::net::TcpStream, within: std::time::Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    match s.read(&mut [0u8; 64]) {
        Ok(0) => true,
        Ok(_) => panic!("the manager sent something to a peer that sent nothing"),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn the_admission_setters_refuse_bad_values_and_take_effect() {
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    use wp_result::*;
    // SAFETY: every pointer passed is NULL (refused), a live local, or a handle returned
    // by the library and freed once.
    unsafe {
        assert_eq!(
            wp_manager_config_set_handshake_timeout_ms(ptr::null_mut(), 1),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_manager_config_set_max_handshakes(ptr::null_mut(), 1),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_manager_config_set_max_handshakes_per_source(ptr::null_mut(), 1),
            WP_RESULT_NULL_PARAMETER
        );
        let mut mc = ptr::null_mut();
        assert_eq!(wp_manager_config_new(&mut mc), WP_RESULT_OK);
        assert_eq!(
            wp_manager_config_set_handshake_timeout_ms(mc, 0),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert!(last_error().contains("1 to 3600000 ms"), "{}", last_error());
        assert_eq!(
            wp_manager_config_set_handshake_timeout_ms(mc, 3_600_001),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert_eq!(
            wp_manager_config_set_max_handshakes(mc, 0),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert!(
            last_error().contains("max_handshakes must"),
            "{}",
            last_error()
        );
        assert_eq!(
            wp_manager_config_set_max_handshakes_per_source(mc, 0),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert!(
            last_error().contains("max_handshakes_per_source must"),
            "{}",
            last_error()
        );
        wp_manager_config_free(mc);
    }
    let dir = scratch("c-abi-admission");
    Certs::new(1).write_to(&dir);
    let long = Duration::from_secs(30);
    // One handshake per source (the default is 8): a second connection from the same
    // address displaces the first at once, long before the (one minute) deadline.
    // SAFETY: the folder holds the certificates the manager loads.
    let m = unsafe { admission_manager(&dir, 60_000, 8, 1) };
    // SAFETY: `m` is a live manager until it is freed below.
    let port = unsafe { wp_manager_port(m) };
    let mut first = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let second = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(cut_within(&mut first, long), "the first was not displaced");
    second.set_nonblocking(true).unwrap();
    assert_eq!(
        second.peek(&mut [0u8; 1]).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the second keeps its slot"
    );
    // SAFETY: `m` is live and freed once, after every other call on it returned.
    unsafe { wp_manager_free(m) };
    // One handshake in all (the default is 256), and a deadline of one second.
    // SAFETY: the folder holds the certificates the manager loads.
    let m = unsafe { admission_manager(&dir, 1000, 1, 8) };
    // SAFETY: `m` is a live manager until it is freed below.
    let port = unsafe { wp_manager_port(m) };
    let since = Instant::now();
    let mut first = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut second = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(cut_within(&mut first, long), "the first was not displaced");
    assert!(
        cut_within(&mut second, DEADLINE),
        "the second was never cut"
    );
    let cut = since.elapsed();
    println!("a silent connection was cut after {cut:?} (deadline 1 s)");
    assert!(cut >= Duration::from_secs(1), "cut after {cut:?}");
    // SAFETY: `m` is live and freed once, after every other call on it returned.
    unsafe { wp_manager_free(m) };
}

/// Builds the static library (cargo test does not) and returns its path.
fn static_lib() -> PathBuf {
    let profile_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--lib", "--quiet"]).current_dir(root());
    if release {
        cmd.arg("--release");
    }
    // Build into this test's own target directory.
    cmd.env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
    assert!(
        cmd.status().unwrap().success(),
        "building the static library failed"
    );
    let lib = profile_dir.join("libworkpool.a");
    assert!(lib.exists(), "{} is missing", lib.display());
    lib
}

fn compile(source: &str, out: &Path, lib: &Path) {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let result = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-I"])
        .arg(root().join("include"))
        .arg(root().join("examples/c").join(source))
        .arg(lib)
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
            "-o",
        ])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{cc} {source}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
}

#[test]
fn the_c_programs_compile_warning_free_and_run_a_pool() {
    let dir = scratch("c-abi");
    let certs = Certs::new(2);
    certs.write_to(&dir);
    let lib = static_lib();
    let embedded = dir.join("embedded_pool");
    compile("embedded_pool.c", &embedded, &lib);
    let out = Command::new(&embedded).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "bad address: WP_RESULT_INVALID_ARGUMENT (\"not an address\" is not a HOST:PORT address)",
        "zero connections per certificate: WP_RESULT_INVALID_ARGUMENT",
        "zero per-source cap: WP_RESULT_INVALID_ARGUMENT (max_handshakes_per_source must be at least 1)",
        "manager on port ok",
        "job 1 stdout: hello from job 1",
        "job 2 stderr: to stderr",
        "job 2 finished: exited 3",
        "job 3 stdout: line 1",
        "job 4 stdout: no newline",
        "sum of exit codes: 3",
        "done",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert_eq!(text.matches("started on c-worker-").count(), 4, "{text}");
    assert_eq!(text.matches("finished: exited").count(), 4, "{text}");
    assert!(text.contains("trust: pinned"), "{text}");

    // The same program with certificates a CA issued: both sides trust the CA instead.
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    write_ca_issued(&ca_dir, 2);
    let out = Command::new(&embedded).arg(&ca_dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("trust: CA"), "{text}");
    assert_eq!(text.matches("finished: exited").count(), 4, "{text}");

    // The lone worker serves the CLI manager.
    let lone = dir.join("lone_worker");
    compile("lone_worker.c", &lone, &lib);
    lone_worker_serves_the_cli_manager(&dir, &lone);

    // Under valgrind: no invalid accesses, nothing definitely lost.
    if have_tool("valgrind") {
        let v = Command::new("valgrind")
            .args([
                "--quiet",
                "--error-exitcode=99",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
            ])
            .arg(format!(
                "--suppressions={}",
                root().join("tests/valgrind.supp").display()
            ))
            .arg(&embedded)
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "valgrind: {}",
            String::from_utf8_lossy(&v.stderr)
        );
    } else {
        missing_prerequisite(
            "the valgrind check of the C example",
            "valgrind is not installed",
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

fn lone_worker_serves_the_cli_manager(dir: &Path, lone: &Path) {
    use std::io::Write;
    let CliManager {
        child: mut manager,
        stdout: mut events,
        addr,
    } = start_cli_manager(dir);
    let port = addr.port().to_string();
    // As root (as in CI), its jobs run as `nobody`.
    let job_user = running_as_root().then_some("nobody");
    let mut worker = Command::new(lone)
        .args(["127.0.0.1", &port, &dir.display().to_string(), "c-lone"])
        .args(job_user)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    manager
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"echo served by $(basename $PWD | cut -c1-12)\nexit 5\n\
              ls /proc/$$/fd > fds; echo fds $(cat fds) as $(id -un)\n",
        )
        .unwrap();
    // End of the manager's stdin: it waits for both jobs, then exits.
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut events, &mut rest).unwrap();
    assert!(manager.wait().unwrap().success());
    let lines: Vec<serde_json::Value> = rest
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let finished: Vec<&serde_json::Value> =
        lines.iter().filter(|e| e["event"] == "finished").collect();
    assert_eq!(finished.len(), 3, "{rest}");
    assert!(finished.iter().all(|e| e["worker"] == "c-lone"), "{rest}");
    assert!(finished.iter().any(|e| e["exit_code"] == 5));
    assert!(rest.contains("served by workpool-job"), "{rest}");
    // The host's own descriptor (opened without O_CLOEXEC) did not reach the job.
    let user = match job_user {
        Some(u) => u.to_string(),
        None => String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string(),
    };
    assert!(rest.contains(&format!("fds 0 1 2 as {user}")), "{rest}");
    drop(worker.stdin.take());
    let out = worker.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("worker stopped"));
}

fn last_error() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for `buf.len()` bytes, which is the length passed.
    let n = unsafe { wp_last_error_message(buf.as_mut_ptr() as *mut _, buf.len()) };
    String::from_utf8_lossy(&buf[..n.min(255)]).into_owned()
}

#[test]
fn null_arguments_are_refused_and_free_null_is_fine() {
    use wp_result::*;
    // SAFETY: every pointer passed is NULL (the point of the test), a live local, or a handle
    // returned by the library and freed once.
    unsafe {
        assert_eq!(
            wp_manager_config_new(ptr::null_mut()),
            WP_RESULT_NULL_PARAMETER
        );
        assert!(last_error().contains("is NULL"));
        let text = CString::new("x").unwrap();
        assert_eq!(
            wp_manager_config_set_listen(ptr::null_mut(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_manager_config_set_identity_pem_files(ptr::null_mut(), text.as_ptr(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_manager_config_add_worker_root_pem_file(ptr::null_mut(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_manager_config_add_worker_certificate_pem_file(ptr::null_mut(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_manager_config_add_worker_ca_pem_file(ptr::null_mut(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_manager_config_set_max_connections_per_certificate(ptr::null_mut(), 1),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_manager_start(ptr::null(), ptr::null_mut()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(wp_manager_port(ptr::null()), 0);
        assert_eq!(
            wp_manager_submit(ptr::null_mut(), text.as_ptr(), ptr::null_mut()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_new(ptr::null_mut()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_set_manager(ptr::null_mut(), text.as_ptr(), 1),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_set_identity_pem_files(ptr::null_mut(), text.as_ptr(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_add_manager_root_pem_file(ptr::null_mut(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_add_manager_certificate_pem_file(ptr::null_mut(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_add_manager_ca_pem_file(ptr::null_mut(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_set_name(ptr::null_mut(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_add_tag(ptr::null_mut(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_set_slots(ptr::null_mut(), 1),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_set_verify_hostname(ptr::null_mut(), true),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_config_set_job_user(ptr::null_mut(), text.as_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_worker_start(ptr::null(), ptr::null_mut()),
            WP_RESULT_NULL_PARAMETER
        );
        let mut ev = std::mem::MaybeUninit::<wp_event>::uninit();
        assert_eq!(
            wp_job_next_event(ptr::null_mut(), 0, ev.as_mut_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(wp_job_cancel(ptr::null_mut()), WP_RESULT_NULL_PARAMETER);
        assert_eq!(wp_job_id(ptr::null()), 0);
        // NULL strings and outputs on a real handle, too.
        let mut mc = ptr::null_mut();
        assert_eq!(wp_manager_config_new(&mut mc), WP_RESULT_OK);
        assert_eq!(
            wp_manager_config_set_listen(mc, ptr::null()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_manager_start(mc, ptr::null_mut()),
            WP_RESULT_NULL_PARAMETER
        );
        wp_manager_config_free(mc);
        wp_manager_config_free(ptr::null_mut());
        wp_manager_free(ptr::null_mut());
        wp_worker_config_free(ptr::null_mut());
        wp_worker_free(ptr::null_mut());
        wp_job_free(ptr::null_mut());
        assert_eq!(
            wp_last_error_message(ptr::null_mut(), 0),
            last_error().len()
        );
    }
}

#[test]
fn bad_text_and_bad_addresses_are_invalid_arguments_and_write_nothing() {
    use wp_result::*;
    // SAFETY: every pointer passed is a NUL-terminated literal, a live local, or a handle
    // returned by the library and freed once.
    unsafe {
        let mut mc = ptr::null_mut();
        assert_eq!(wp_manager_config_new(&mut mc), WP_RESULT_OK);
        let not_utf8 = CString::new(vec![b'a', 0xff, b'b']).unwrap();
        assert_eq!(
            wp_manager_config_set_listen(mc, not_utf8.as_ptr()),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert!(last_error().contains("UTF-8"), "{}", last_error());
        let bad = CString::new("nowhere").unwrap();
        assert_eq!(
            wp_manager_config_set_listen(mc, bad.as_ptr()),
            WP_RESULT_INVALID_ARGUMENT
        );
        // Without an identity the manager cannot start, and *out stays untouched.
        let mut manager: *mut wp_manager = std::ptr::dangling_mut::<wp_manager>();
        assert_eq!(
            wp_manager_start(mc, &mut manager),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert_eq!(
            manager,
            std::ptr::dangling_mut::<wp_manager>(),
            "a failed call wrote its output"
        );
        let missing = CString::new("/nonexistent/cert.pem").unwrap();
        assert_eq!(
            wp_manager_config_set_identity_pem_files(mc, missing.as_ptr(), missing.as_ptr()),
            WP_RESULT_IO
        );
        assert!(last_error().contains("/nonexistent/cert.pem"));
        wp_manager_config_free(mc);

        let mut wc = ptr::null_mut();
        assert_eq!(wp_worker_config_new(&mut wc), WP_RESULT_OK);
        assert_eq!(
            wp_worker_config_set_name(wc, not_utf8.as_ptr()),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert_eq!(
            wp_worker_config_add_tag(wc, not_utf8.as_ptr()),
            WP_RESULT_INVALID_ARGUMENT
        );
        let empty = CString::new("").unwrap();
        assert_eq!(
            wp_worker_config_set_manager(wc, empty.as_ptr(), 9001),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert_eq!(
            wp_worker_config_set_slots(wc, 0),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert_eq!(
            wp_worker_config_set_job_user(wc, empty.as_ptr()),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert_eq!(
            wp_worker_config_set_job_user(wc, ptr::null()),
            WP_RESULT_NULL_PARAMETER
        );
        let mut worker: *mut wp_worker = ptr::null_mut();
        assert_eq!(wp_worker_start(wc, &mut worker), WP_RESULT_INVALID_ARGUMENT);
        assert!(worker.is_null());
        wp_worker_config_free(wc);
        let name = wp_result_name(WP_RESULT_QUEUE_FULL as u32);
        assert_eq!(
            std::ffi::CStr::from_ptr(name).to_str().unwrap(),
            "WP_RESULT_QUEUE_FULL"
        );
        // Any integer a C program passes is answered, none is taken for a Rust enum.
        for code in [12, 9999, u32::MAX] {
            let name = wp_result_name(code);
            assert_eq!(
                std::ffi::CStr::from_ptr(name).to_str().unwrap(),
                "WP_RESULT_UNKNOWN"
            );
        }
    }
}

#[test]
fn a_normal_build_does_not_export_the_panic_hook() {
    let lib = std::fs::read(static_lib()).unwrap();
    let hook = b"wp_debug_panic";
    assert!(
        !lib.windows(hook.len()).any(|w| w == hook),
        "the static library of a normal build holds wp_debug_panic"
    );
    // ... while the public entry points are there.
    let name = b"wp_result_name";
    assert!(lib.windows(name.len()).any(|w| w == name));
}

#[test]
fn a_panic_inside_becomes_wp_result_panic() {
    assert_eq!(wp_debug_panic(), wp_result::WP_RESULT_PANIC);
    assert!(last_error().contains("panicked"));
}

#[test]
fn pinned_certificates_and_cas_go_through_separate_setters() {
    use wp_result::*;
    let dir = scratch("c-trust");
    write_ca_issued(&dir, 1);
    let file = |f: &str| CString::new(dir.join(f).to_str().unwrap()).unwrap();
    let (ca, issued) = (file("ca-cert.pem"), file("worker-0-cert.pem"));
    // SAFETY: every pointer passed is a live CString, a live local, or a handle returned
    // by the library and freed once.
    unsafe {
        let mut mc = ptr::null_mut();
        assert_eq!(wp_manager_config_new(&mut mc), WP_RESULT_OK);
        // A certificate a CA issued cannot be pinned (it would need its issuer)...
        for pin in [
            wp_manager_config_add_worker_certificate_pem_file,
            wp_manager_config_add_worker_root_pem_file,
        ] {
            assert_eq!(pin(mc, issued.as_ptr()), WP_RESULT_INVALID_ARGUMENT);
            assert!(last_error().contains("self-signed"), "{}", last_error());
        }
        // ...while its CA is taken as a CA, and a self-signed one can be pinned.
        assert_eq!(
            wp_manager_config_add_worker_ca_pem_file(mc, ca.as_ptr()),
            WP_RESULT_OK
        );
        assert_eq!(
            wp_manager_config_add_worker_certificate_pem_file(mc, ca.as_ptr()),
            WP_RESULT_OK
        );
        wp_manager_config_free(mc);

        let mut wc = ptr::null_mut();
        assert_eq!(wp_worker_config_new(&mut wc), WP_RESULT_OK);
        for pin in [
            wp_worker_config_add_manager_certificate_pem_file,
            wp_worker_config_add_manager_root_pem_file,
        ] {
            assert_eq!(pin(wc, issued.as_ptr()), WP_RESULT_INVALID_ARGUMENT);
        }
        assert_eq!(
            wp_worker_config_add_manager_ca_pem_file(wc, ca.as_ptr()),
            WP_RESULT_OK
        );
        let key = file("worker-0-key.pem");
        assert_eq!(
            wp_worker_config_add_manager_ca_pem_file(wc, key.as_ptr()),
            WP_RESULT_TLS
        );
        assert!(last_error().contains("no CERTIFICATE"), "{}", last_error());
        wp_worker_config_free(wc);
    }
    std::fs::remove_dir_all(dir).unwrap();
}
