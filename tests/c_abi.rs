//! The C ABI: the committed header matches the generated one and documents every
//! function; the C example programs compile with `-Wall -Wextra -Werror` against the static
//! library, call every function of the header, and run on loopback with real TLS (also
//! under valgrind and under clang's address and undefined-behaviour sanitizers); the module
//! map imports as a clang module, as Swift reads it; every public Rust method and setting
//! has a C counterpart (docs/C-API.md); every entry point copes with NULL, bad text, bad
//! numbers, panics and several threads; the log callback gets every record.

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

/// What a program linked against the static library needs besides it.
const LINK: [&str; 7] = [
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// The C compiler: `$CC`, or `cc`.
fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

/// Whether the C compiler is there; if not, says so (a failure under `CI=true`).
fn have_cc(test: &str) -> bool {
    let found = have_tool(&cc());
    if !found {
        missing_prerequisite(test, &format!("the C compiler {} is not installed", cc()));
    }
    found
}

fn compile(source: &str, out: &Path, lib: &Path) {
    compile_with(&cc(), &[], source, out, lib);
}

/// Compiles `examples/c/SOURCE` with `cc`, `-std=c11 -Wall -Wextra -Werror -g` and
/// `flags`, linked (by the C compiler) against the static library.
fn compile_with(cc: &str, flags: &[&str], source: &str, out: &Path, lib: &Path) {
    let result = Command::new(cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"])
        .args(flags)
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("examples/c").join(source))
        .arg(lib)
        .args(LINK)
        .arg("-o")
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
    if !have_cc("the C examples") {
        return;
    }
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
            wp_manager_config_set_max_heartbeats_per_second(ptr::null_mut(), 1),
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
            wp_worker_config_set_ahead(ptr::null_mut(), 1),
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
        for r in [
            wp_job_write_stdin(ptr::null_mut(), b"x".as_ptr(), 1),
            wp_job_close_stdin(ptr::null_mut()),
            wp_job_resize(ptr::null_mut(), 1, 1),
        ] {
            assert_eq!(r, WP_RESULT_NULL_PARAMETER);
        }
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
            wp_worker_config_set_ahead(wc, 1025),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert_eq!(wp_worker_config_set_ahead(wc, 0), WP_RESULT_OK);
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
        let name = wp_result_name(WP_RESULT_JOURNAL as u32);
        assert_eq!(
            std::ffi::CStr::from_ptr(name).to_str().unwrap(),
            "WP_RESULT_JOURNAL"
        );
        // Any integer a C program passes is answered, none is taken for a Rust enum.
        for code in [15, 9999, u32::MAX] {
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

/// Runs `program CERT_DIR` (under `wrapper`, if any) with `env`; returns (success,
/// stdout, stderr).
fn run_program(
    wrapper: &[String],
    program: &Path,
    dir: &Path,
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.arg(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Certificates for a manager and two workers in a fresh folder.
fn cert_dir(name: &str) -> PathBuf {
    let dir = scratch(name);
    Certs::new(2).write_to(&dir);
    dir
}

/// What `examples/c/full_api.c` prints when every call did what it should.
const FULL_API_LINES: &[&str] = &[
    "log level 9: WP_RESULT_INVALID_ARGUMENT (9 is not a log level",
    "nothing trusted: WP_RESULT_INVALID_ARGUMENT (invalid configuration: no worker or submitter certificates or CAs are trusted",
    "missing submitter CA: WP_RESULT_IO (reading CA certificate /nonexistent/ca.pem: ",
    "missing submitter certificate: WP_RESULT_IO (reading certificate /nonexistent/submitter.pem: ",
    "a key as a submitter CA: WP_RESULT_TLS (PEM: ",
    "submitters-only manager: started",
    "worker with a submitter certificate: sessions 0, refusal logged: yes",
    "zero queue capacity: WP_RESULT_INVALID_ARGUMENT (queue_capacity must be at least 1)",
    "zero heartbeat interval: WP_RESULT_INVALID_ARGUMENT",
    "bad metrics address: WP_RESULT_INVALID_ARGUMENT",
    "metrics port: ok",
    "empty platform: WP_RESULT_INVALID_ARGUMENT (a platform must have 1 to 256 bytes)",
    "missing work folder: WP_RESULT_INVALID_ARGUMENT (work_dir /nonexistent/work is not a folder)",
    "zero backoff: WP_RESULT_INVALID_ARGUMENT",
    "empty job user: WP_RESULT_INVALID_ARGUMENT",
    "joined: c-worker-0 platform c-platform slots 2 tags c gpu\n",
    "joined: c-worker-1 platform c-platform slots 2 tags c\n",
    "worker c-worker-0: connected, sessions 1, attempts ok",
    "worker c-worker-1: connected, sessions 1, attempts ok",
    "workers listed: 2",
    "listed: c-worker-0 on c-platform, 2 slots, running 0, draining 0, address known",
    "listed: c-worker-1 on c-platform, 2 slots, running 0, draining 0, address known",
    "blank script: WP_RESULT_INVALID_ARGUMENT (the script is empty)",
    "reserved variable: WP_RESULT_INVALID_ARGUMENT (WORKPOOL_X: WORKPOOL_ variables are set by the worker)",
    "variable name with =: WP_RESULT_INVALID_ARGUMENT",
    "zero timeout: WP_RESULT_INVALID_ARGUMENT",
    "empty tag: WP_RESULT_INVALID_ARGUMENT",
    "stdin NULL with a length: WP_RESULT_NULL_PARAMETER",
    "wire size: ok",
    "interactive cat: 3 lines echoed one at a time, outcome exited, exit 0",
    "write after close: WP_RESULT_STDIN_CLOSED (stdin closed",
    "stdin of a plain job: WP_RESULT_INVALID_ARGUMENT (invalid job: job ",
    "resize of a plain job: WP_RESULT_INVALID_ARGUMENT (",
    "zero-row terminal: WP_RESULT_INVALID_ARGUMENT (a terminal must have at least one row and one column",
    "pty size: 24 80",
    "pty resized: 40 100, outcome exited",
    "full job: outcome exited, exit 0, signal 0, attempts 1, on c-worker-",
    // The environment, and the stdin bytes (a NUL and 0xff among them) as od saw them.
    "full job stdout: hello, c\n 61 00 62 0a ff \n",
    "second wait: WP_RESULT_ENDED",
    "capped: 64 bytes, truncated 1",
    "timeout: outcome timed_out, exit -1",
    "signal: outcome signaled, signal 9, exit -1",
    "signal event: outcome signaled, signal 15, exit 0, attempt 0",
    "queued status: state queued, worker none, attempt 1, priority 7, script true, paused 0, since ok",
    "queued job listed: yes",
    "cancelled queued: outcome cancelled",
    "cancel again: WP_RESULT_UNKNOWN_JOB",
    "status after the end: WP_RESULT_UNKNOWN_JOB",
    "running status: state running, on c-worker-: yes",
    "cancelled running: outcome cancelled, exit 0, signal 0, attempt 0",
    "wait after the last event: WP_RESULT_ENDED",
    "output paused: yes",
    "paused job: outcome cancelled, kept 64 bytes, truncated 1",
    "stats: workers 2, slots 4, submitted 11, ended 11, exited 5, timed out 1, signaled 2, cancelled 3, queued 0",
    "per worker: 2",
    "worker stats: c-worker-0, slots 2, running 0, draining 0",
    "worker stats: c-worker-1, slots 2, running 0, draining 0",
    "worker stats past the end: WP_RESULT_INVALID_ARGUMENT",
    "prometheus has workpool_workers 2: yes",
    "requeued: attempt 2, exit 0, outcome none",
    "stopped worker connected: 0",
    "restarted on: c-worker-0",
    "wait before draining: WP_RESULT_TIMEOUT",
    "drained under it: outcome cancelled",
    "drained after: outcome exited, exit 0, stdout finished while draining",
    "left: c-worker-1 (a reason is given)",
    "at shutdown: outcome rejected, reason given yes",
    "submit after shutdown: WP_RESULT_SHUT_DOWN",
    "pool events after shutdown: WP_RESULT_SHUT_DOWN",
    "log records: yes, saw listening: yes",
    "done",
];

fn assert_full_api_output(ok: bool, text: &str, stderr: &str) {
    assert!(ok, "full_api failed:\n{text}\n{stderr}");
    for line in FULL_API_LINES {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // Worker 0 joined, was stopped, joined again and was drained.
    assert_eq!(text.matches("joined: c-worker-0 ").count(), 2, "{text}");
    assert_eq!(
        text.matches("left: c-worker-0 (a reason is given)").count(),
        2,
        "{text}"
    );
}

#[test]
fn the_full_api_example_uses_every_option_and_control_against_a_pool() {
    if !have_cc("full_api.c") {
        return;
    }
    let dir = cert_dir("c-full-api");
    let lib = static_lib();
    let program = dir.join("full_api");
    compile("full_api.c", &program, &lib);
    let (ok, text, stderr) = run_program(&[], &program, &dir, &[]);
    assert_full_api_output(ok, &text, &stderr);
    std::fs::remove_dir_all(dir).unwrap();
}

/// valgrind's memcheck as the C tests run it: any error, or a definite leak, fails.
fn valgrind() -> Vec<String> {
    vec![
        "valgrind".into(),
        "--quiet".into(),
        "--error-exitcode=99".into(),
        "--leak-check=full".into(),
        "--errors-for-leak-kinds=definite".into(),
        format!(
            "--suppressions={}",
            root().join("tests/valgrind.supp").display()
        ),
    ]
}

#[test]
fn the_full_api_example_is_clean_under_valgrind_and_a_leaked_handle_is_caught() {
    if !have_tool("valgrind") {
        return missing_prerequisite(
            "the valgrind run of full_api.c",
            "valgrind is not installed",
        );
    }
    if !have_cc("the valgrind run of full_api.c") {
        return;
    }
    let dir = cert_dir("c-full-api-valgrind");
    let lib = static_lib();
    let program = dir.join("full_api");
    compile("full_api.c", &program, &lib);
    let (ok, text, stderr) = run_program(&valgrind(), &program, &dir, &[]);
    assert!(ok, "valgrind: {stderr}");
    assert_full_api_output(ok, &text, &stderr);
    // The same run with one spec never freed fails: the check can see a leaked handle.
    let (ok, text, stderr) = run_program(
        &valgrind(),
        &program,
        &dir,
        &[("FULL_API_LEAK_ONE_SPEC", "1")],
    );
    assert!(text.contains("leaked a spec"), "{text}");
    assert!(!ok, "valgrind missed a leaked spec");
    assert!(stderr.contains("definitely lost"), "{stderr}");
    assert!(stderr.contains("wp_job_spec_new"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// ASan (leaks included) and UBSan, every report fatal. The Rust code is not
/// instrumented, but its memory comes from the same malloc, which ASan replaces: a
/// handle never freed, freed twice, or read after its free is reported.
fn sanitizer_env() -> [(&'static str, &'static str); 2] {
    [
        (
            "ASAN_OPTIONS",
            "detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=86",
        ),
        ("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1"),
    ]
}

#[test]
fn the_full_api_example_is_clean_under_address_and_undefined_behaviour_sanitizers() {
    if !have_tool("clang") {
        return missing_prerequisite("the sanitizer run of full_api.c", "clang is not installed");
    }
    let dir = cert_dir("c-full-api-asan");
    // clang's sanitizer runtimes come in a package of their own.
    let probe = dir.join("probe.c");
    std::fs::write(&probe, "int main(void) { return 0; }\n").unwrap();
    let runtimes = Command::new("clang")
        .args(["-fsanitize=address,undefined", "-o"])
        .arg(dir.join("probe"))
        .arg(&probe)
        .output()
        .unwrap();
    if !runtimes.status.success() {
        return missing_prerequisite(
            "the sanitizer run of full_api.c",
            &format!(
                "clang cannot link -fsanitize=address,undefined (libclang-rt-dev?): {}",
                String::from_utf8_lossy(&runtimes.stderr)
            ),
        );
    }
    let lib = static_lib();
    let program = dir.join("full_api_asan");
    // Linked by clang, so that the sanitizer runtimes come in; the static library itself is
    // built as always.
    compile_with(
        "clang",
        &[
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
        ],
        "full_api.c",
        &program,
        &lib,
    );
    let (ok, text, stderr) = run_program(&[], &program, &dir, &sanitizer_env());
    assert!(!stderr.contains("Sanitizer"), "{stderr}");
    assert_full_api_output(ok, &text, &stderr);
    // Leak detection works here (it needs ptrace-like access some containers deny).
    let mut env = sanitizer_env().to_vec();
    env.push(("FULL_API_LEAK_ONE_SPEC", "1"));
    let (ok, text, stderr) = run_program(&[], &program, &dir, &env);
    assert!(text.contains("leaked a spec"), "{text}");
    assert!(!ok, "LeakSanitizer missed a leaked spec");
    assert!(
        stderr.contains("LeakSanitizer: detected memory leaks"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Certificates for a manager, two workers and a submitter (`submitter-1-*.pem`, as the
/// CLI names them) in a fresh folder.
fn remote_cert_dir(name: &str) -> PathBuf {
    let dir = cert_dir(name);
    let s = workpool::tls::generate_submitter_certificate(
        &["submitter-1"],
        workpool::tls::DEFAULT_VALIDITY_DAYS,
    )
    .unwrap();
    std::fs::write(dir.join("submitter-1-cert.pem"), &s.cert_pem).unwrap();
    std::fs::write(dir.join("submitter-1-key.pem"), &s.key_pem).unwrap();
    dir
}

/// What `examples/c/remote_client.c` prints when every call did what it should.
const REMOTE_CLIENT_LINES: &[&str] = &[
    "client without a manager: WP_RESULT_INVALID_ARGUMENT (the client needs wp_client_config_set_manager and wp_client_config_set_identity_pem_files)",
    "empty manager host: WP_RESULT_INVALID_ARGUMENT (the manager's host must not be empty nor its port 0)",
    "client name with a newline: WP_RESULT_INVALID_ARGUMENT (the client name a\\nb contains control",
    "zero connect timeout: WP_RESULT_INVALID_ARGUMENT (the connect timeout must be 1 to 31536000000 ms, not 0)",
    "zero first backoff: WP_RESULT_INVALID_ARGUMENT (the first reconnect wait must be 1 to",
    "reconnect grace over 365 days: WP_RESULT_INVALID_ARGUMENT (the reconnect grace must be 0 to 31536000000 ms",
    "missing manager CA: WP_RESULT_IO (reading CA certificate /nonexistent/ca.pem: ",
    "worker certificate as a submitter: WP_RESULT_PROTOCOL, says why: yes",
    "client c-remote-client: connected 1",
    // Event by event: the bytes of each stream and the exit code.
    "remote job events: started on c-remote-worker, stdout \"out\", stderr \"err\", exited 7",
    "wait after the last event: WP_RESULT_ENDED",
    "remote job result: exited 7, stdout out, stderr err, on c-remote-worker",
    "array first after last: WP_RESULT_INVALID_ARGUMENT (an array's first index (3) is after its last (1))",
    "array out too short: WP_RESULT_INVALID_ARGUMENT (out_len is 2, but the array 1..=3 has 3 jobs)",
    "array job 0: exited 0, index 1",
    "array job 1: exited 0, index 2",
    "array job 2: exited 0, index 3",
    "remote status: running 1, on c-remote-worker, script sleep 600",
    "remote jobs: 1, the sleeping one listed: 1",
    "remote workers: 1, c-remote-worker with 4 slots running 1",
    "remote stats: workers 1, submitted 6, running 1, exited 5",
    "cancelled by id: cancelled",
    "cancel an ended job: WP_RESULT_UNKNOWN_JOB",
    "status of an ended job: WP_RESULT_UNKNOWN_JOB",
    "attach to no such job: WP_RESULT_UNKNOWN_JOB",
    "cancelled by handle: cancelled",
    "closed: connected 0",
    "submit after close: WP_RESULT_SHUT_DOWN (the client is closed (wp_client_close))",
    "attached job after close: rejected",
    "attached from another client: exited 3, stdout kept",
    "done",
];

fn assert_remote_client_output(ok: bool, text: &str, stderr: &str) {
    assert!(ok, "remote_client failed:\n{text}\n{stderr}");
    for line in REMOTE_CLIENT_LINES {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn the_remote_client_example_submits_follows_lists_and_cancels_through_a_manager() {
    if !have_cc("remote_client.c") {
        return;
    }
    let dir = remote_cert_dir("c-remote-client");
    let lib = static_lib();
    let program = dir.join("remote_client");
    compile("remote_client.c", &program, &lib);
    let (ok, text, stderr) = run_program(&[], &program, &dir, &[]);
    assert_remote_client_output(ok, &text, &stderr);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_remote_client_example_is_clean_under_valgrind() {
    if !have_tool("valgrind") {
        return missing_prerequisite(
            "the valgrind run of remote_client.c",
            "valgrind is not installed",
        );
    }
    if !have_cc("the valgrind run of remote_client.c") {
        return;
    }
    let dir = remote_cert_dir("c-remote-client-valgrind");
    let lib = static_lib();
    let program = dir.join("remote_client");
    compile("remote_client.c", &program, &lib);
    let (ok, text, stderr) = run_program(&valgrind(), &program, &dir, &[]);
    assert!(ok, "valgrind: {stderr}\n{text}");
    assert_remote_client_output(ok, &text, &stderr);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_remote_client_example_is_clean_under_address_and_undefined_behaviour_sanitizers() {
    let test = "the sanitizer run of remote_client.c";
    if !have_tool("clang") {
        return missing_prerequisite(test, "clang is not installed");
    }
    let dir = remote_cert_dir("c-remote-client-asan");
    let probe = dir.join("probe.c");
    std::fs::write(&probe, "int main(void) { return 0; }\n").unwrap();
    let runtimes = Command::new("clang")
        .args(["-fsanitize=address,undefined", "-o"])
        .arg(dir.join("probe"))
        .arg(&probe)
        .output()
        .unwrap();
    if !runtimes.status.success() {
        return missing_prerequisite(
            test,
            &format!(
                "clang cannot link -fsanitize=address,undefined (libclang-rt-dev?): {}",
                String::from_utf8_lossy(&runtimes.stderr)
            ),
        );
    }
    let lib = static_lib();
    let program = dir.join("remote_client_asan");
    compile_with(
        "clang",
        &[
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
        ],
        "remote_client.c",
        &program,
        &lib,
    );
    let (ok, text, stderr) = run_program(&[], &program, &dir, &sanitizer_env());
    assert!(!stderr.contains("Sanitizer"), "{stderr}");
    assert_remote_client_output(ok, &text, &stderr);
    std::fs::remove_dir_all(dir).unwrap();
}

/// What `examples/c/journal.c` prints when every call did what it should.
const JOURNAL_LINES: &[&str] = &[
    "empty journal path: WP_RESULT_INVALID_ARGUMENT (the journal's path is empty)",
    "NULL journal path: WP_RESULT_NULL_PARAMETER",
    "journal retention over 365 days: WP_RESULT_INVALID_ARGUMENT (the journal's retention must be",
    "first manager: 2 job(s), 2 queued",
    "a second manager on the journal: WP_RESULT_JOURNAL (journal: ",
    "a folder as the journal: WP_RESULT_JOURNAL (journal: ",
    "journal bytes: some",
    "after the restart: 2 job(s), 2 queued",
    "ids go on: yes",
    "jobs that exited after the restart: 3",
    "done",
];

fn assert_journal_output(ok: bool, text: &str, stderr: &str) {
    assert!(ok, "journal failed:\n{text}\n{stderr}");
    for line in JOURNAL_LINES {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn the_journal_example_restarts_a_manager_that_goes_on_with_its_queue() {
    if !have_cc("journal.c") {
        return;
    }
    let dir = cert_dir("c-journal");
    let lib = static_lib();
    let program = dir.join("journal");
    compile("journal.c", &program, &lib);
    let (ok, text, stderr) = run_program(&[], &program, &dir, &[]);
    assert_journal_output(ok, &text, &stderr);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_journal_example_is_clean_under_valgrind() {
    if !have_tool("valgrind") {
        return missing_prerequisite("the valgrind run of journal.c", "valgrind is not installed");
    }
    if !have_cc("the valgrind run of journal.c") {
        return;
    }
    let dir = cert_dir("c-journal-valgrind");
    let lib = static_lib();
    let program = dir.join("journal");
    compile("journal.c", &program, &lib);
    let (ok, text, stderr) = run_program(&valgrind(), &program, &dir, &[]);
    assert!(ok, "valgrind: {stderr}\n{text}");
    assert_journal_output(ok, &text, &stderr);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_client_entry_points_refuse_null_and_bad_values_and_accessors_answer_null_with_a_default() {
    use wp_result::*;
    // What the header promises to share between threads is Sync; what it gives to one
    // thread at a time may move between threads (checked when this compiles).
    fn shared<T: Sync + Send>() {}
    fn moved<T: Send>() {}
    shared::<wp_client>();
    moved::<wp_client_config>();
    let c = |s: &str| CString::new(s).unwrap();
    let text = c("x");
    let s = text.as_ptr();
    // SAFETY: every pointer passed is NULL (the point of the test), a live CString, a live
    // local, or a handle returned by the library and freed once.
    unsafe {
        let cn: *mut wp_client_config = ptr::null_mut();
        for r in [
            wp_client_config_new(ptr::null_mut()),
            wp_client_config_set_manager(cn, s, 1),
            wp_client_config_set_identity_pem_files(cn, s, s),
            wp_client_config_add_manager_certificate_pem_file(cn, s),
            wp_client_config_add_manager_ca_pem_file(cn, s),
            wp_client_config_set_verify_hostname(cn, false),
            wp_client_config_set_name(cn, s),
            wp_client_config_set_connect_timeout_ms(cn, 1),
            wp_client_config_set_backoff_initial_ms(cn, 1),
            wp_client_config_set_backoff_max_ms(cn, 1),
            wp_client_config_set_reconnect_grace_ms(cn, 1),
            wp_client_config_set_result_output_limit(cn, 1),
            wp_client_connect(ptr::null(), ptr::null_mut()),
        ] {
            assert_eq!(r, WP_RESULT_NULL_PARAMETER);
        }
        let cl: *const wp_client = ptr::null();
        let mut job = ptr::null_mut();
        let mut jobs = [ptr::null_mut(); 1];
        let mut status = ptr::null_mut();
        let mut list = ptr::null_mut();
        let mut workers = ptr::null_mut();
        let mut stats = ptr::null_mut();
        for r in [
            wp_client_submit(cl, s, &mut job),
            wp_client_submit_spec(cl, ptr::null(), &mut job),
            wp_client_submit_array(cl, ptr::null(), 1, 1, jobs.as_mut_ptr(), 1),
            wp_client_attach(cl, 1, &mut job),
            wp_client_job(cl, 1, &mut status),
            wp_client_jobs(cl, &mut list),
            wp_client_workers(cl, &mut workers),
            wp_client_stats(cl, &mut stats),
            wp_client_cancel(cl, 1),
            wp_client_close(cl),
        ] {
            assert_eq!(r, WP_RESULT_NULL_PARAMETER);
        }
        assert!(job.is_null() && jobs[0].is_null() && status.is_null() && list.is_null());
        assert!(workers.is_null() && stats.is_null());
        assert!(wp_client_name(cl).is_null());
        assert!(!wp_client_is_connected(cl));
        wp_client_free(ptr::null_mut());
        wp_client_config_free(ptr::null_mut());

        // NULL strings and outputs on a real configuration, and values out of range.
        let mut cc = ptr::null_mut();
        assert_eq!(wp_client_config_new(&mut cc), WP_RESULT_OK);
        assert_eq!(
            wp_client_config_set_manager(cc, ptr::null(), 1),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_client_config_set_manager(cc, s, 0),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert_eq!(
            wp_client_config_set_name(cc, c("").as_ptr()),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert!(last_error().contains("1 to 256 bytes"), "{}", last_error());
        let not_utf8 = CString::new(vec![b'a', 0xff]).unwrap();
        assert_eq!(
            wp_client_config_set_name(cc, not_utf8.as_ptr()),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert!(last_error().contains("UTF-8"), "{}", last_error());
        assert_eq!(
            wp_client_config_set_backoff_max_ms(cc, u64::MAX),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert_eq!(wp_client_config_set_reconnect_grace_ms(cc, 0), WP_RESULT_OK);
        assert_eq!(
            wp_client_connect(cc, ptr::null_mut()),
            WP_RESULT_NULL_PARAMETER
        );
        // Settings that each pass but do not work together are refused when connecting,
        // before any connection is tried.
        let dir = remote_cert_dir("c-client-setters");
        let file = |f: &str| c(dir.join(f).to_str().unwrap());
        let (cert, key) = (file("submitter-1-cert.pem"), file("submitter-1-key.pem"));
        assert_eq!(
            wp_client_config_set_identity_pem_files(cc, cert.as_ptr(), key.as_ptr()),
            WP_RESULT_OK
        );
        assert_eq!(
            wp_client_config_set_manager(cc, c("127.0.0.1").as_ptr(), 9),
            WP_RESULT_OK
        );
        assert_eq!(
            wp_client_config_set_backoff_initial_ms(cc, 2000),
            WP_RESULT_OK
        );
        assert_eq!(wp_client_config_set_backoff_max_ms(cc, 1000), WP_RESULT_OK);
        let mut client: *mut wp_client = ptr::null_mut();
        assert_eq!(
            wp_client_connect(cc, &mut client),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert!(last_error().contains("backoff_initial"), "{}", last_error());
        assert!(client.is_null());
        wp_client_config_free(cc);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn the_module_map_imports_as_a_clang_module_the_way_swift_reads_it() {
    if !have_tool("clang") {
        return missing_prerequisite("the clang module import", "clang is not installed");
    }
    let dir = scratch("c-module");
    let lib = static_lib();
    let program = dir.join("module_import");
    // No -I: clang finds the header through the module map alone, as Swift's importer
    // does with the include folder on its import path; `@import WorkPool;` fails unless
    // the map declares the module and its header builds as one.
    let result = Command::new("clang")
        .args(["-fmodules", "-Wall", "-Wextra", "-Werror"])
        .arg(format!(
            "-fmodules-cache-path={}",
            dir.join("cache").display()
        ))
        .arg(format!(
            "-fmodule-map-file={}",
            root().join("include/module.modulemap").display()
        ))
        .arg(root().join("examples/c/module_import.m"))
        .arg(&lib)
        .args(LINK)
        .arg("-o")
        .arg(&program)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "clang -fmodules: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let modulemap = std::fs::read_to_string(root().join("include/module.modulemap")).unwrap();
    assert!(modulemap.contains("module WorkPool"), "{modulemap}");
    let out = Command::new(&program).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in [
        "reserved variable: WP_RESULT_INVALID_ARGUMENT",
        "valid: WP_RESULT_OK, wire size ok",
        "start without identity: WP_RESULT_INVALID_ARGUMENT (the manager has no identity: call wp_manager_config_set_identity_pem_files), manager untouched",
        "log level off again: WP_RESULT_OK",
        "module ok",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The names of the functions `include/workpool.h` declares.
fn header_functions() -> Vec<String> {
    let header = std::fs::read_to_string(root().join("include/workpool.h")).unwrap();
    let mut names = Vec::new();
    for line in header.lines() {
        let first = line.chars().next().unwrap_or(' ');
        if !first.is_ascii_alphabetic() || line.starts_with("typedef") {
            continue;
        }
        let Some(open) = line.find('(') else {
            continue;
        };
        let before = &line[..open];
        let start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let name = &before[start..];
        if name.starts_with("wp_") {
            names.push(name.to_string());
        }
    }
    names
}

/// Whether `word` occurs in `text` as a whole identifier.
fn has_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let before = text[..i].chars().next_back().is_none_or(|c| !ident(c));
        let after = text[i + word.len()..]
            .chars()
            .next()
            .is_none_or(|c| !ident(c));
        before && after
    })
}

#[test]
fn every_function_of_the_header_is_called_by_a_c_example() {
    let functions = header_functions();
    assert!(functions.len() > 100, "{functions:?}");
    let mut examples = String::new();
    for entry in std::fs::read_dir(root().join("examples/c")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "c" || e == "m") {
            examples.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    let unused: Vec<&String> = functions
        .iter()
        .filter(|f| !has_word(&examples, f))
        .collect();
    assert!(
        unused.is_empty(),
        "no C example calls these functions of include/workpool.h: {unused:?}"
    );
}

/// Every Rust source file of the library, one after the other (so that the checks below
/// do not depend on which file of a module holds a type).
fn library_sources() -> String {
    fn walk(dir: &Path, out: &mut String) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
                out.push('\n');
            }
        }
    }
    let mut all = String::new();
    walk(&root().join("src"), &mut all);
    all
}

/// The `pub fn` names of `impl TYPE {` in the library's sources (methods of the type
/// itself, not of a trait), as rustfmt lays them out.
fn public_methods(ty: &str) -> Vec<String> {
    block_items(ty, &format!("impl {ty} {{"), |line| {
        let rest = line.strip_prefix("    pub fn ")?;
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        Some(&rest[..end])
    })
}

/// The `pub` fields of `pub struct TYPE {` in the library's sources.
fn public_fields(ty: &str) -> Vec<String> {
    block_items(ty, &format!("pub struct {ty} {{"), |line| {
        Some(line.strip_prefix("    pub ")?.split_once(':')?.0)
    })
}

/// `TYPE::name` for each line between `open` and its closing `}` (at the top level, as
/// rustfmt lays them out) from which `name_of` takes a name.
fn block_items(ty: &str, open: &str, name_of: impl Fn(&str) -> Option<&str>) -> Vec<String> {
    let source = library_sources();
    let mut names = Vec::new();
    let mut inside = false;
    for line in source.lines() {
        if line == open {
            inside = true;
        } else if inside && line == "}" {
            inside = false;
        } else if inside && let Some(name) = name_of(line) {
            names.push(format!("{ty}::{name}"));
        }
    }
    assert!(!names.is_empty(), "no `{open}` with public items in src/");
    names
}

#[test]
fn every_public_method_and_setting_of_the_rust_api_has_a_c_counterpart() {
    let mut rust = Vec::new();
    for ty in [
        "Manager",
        "JobHandle",
        "Worker",
        "JobSpec",
        "Client",
        "RemoteJob",
    ] {
        rust.extend(public_methods(ty));
    }
    for ty in ["ManagerConfig", "WorkerConfig", "ClientConfig"] {
        rust.extend(public_fields(ty));
    }
    // The table of docs/C-API.md: | `Rust::name` | `wp_function`, ... | notes |
    let doc = std::fs::read_to_string(root().join("docs/C-API.md")).unwrap();
    let header = header_functions();
    let mut table = std::collections::HashMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') || !cells[1].contains("::") {
            continue;
        }
        let name = cells[1].trim_matches('`').to_string();
        let functions: Vec<String> = cells[2]
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("wp_"))
            .map(String::from)
            .collect();
        table.insert(name, functions);
    }
    let mut problems = Vec::new();
    for name in &rust {
        match table.get(name) {
            None => problems.push(format!("{name} has no row in docs/C-API.md")),
            Some(functions) if functions.is_empty() => {
                problems.push(format!("{name}'s row names no C function"))
            }
            Some(functions) => {
                for f in functions {
                    if !header.contains(f) {
                        problems.push(format!("{name}: {f} is not in include/workpool.h"));
                    }
                }
            }
        }
    }
    // And the table holds nothing the Rust API no longer has.
    for name in table.keys() {
        if !rust.contains(name) {
            problems.push(format!("docs/C-API.md has a row for {name}, which is gone"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    println!(
        "{} Rust methods and settings, each with its C counterpart",
        rust.len()
    );
}

#[test]
fn every_new_entry_point_refuses_null_and_accessors_answer_null_with_a_default() {
    use wp_result::*;
    let text = CString::new("x").unwrap();
    let (s, n) = (text.as_ptr(), ptr::null_mut());
    // SAFETY: every pointer passed is NULL (the point of the test) or a live CString.
    unsafe {
        // Configurations.
        for r in [
            wp_manager_config_set_queue_capacity(n, 1),
            wp_manager_config_set_heartbeat_interval_ms(n, 1),
            wp_manager_config_set_heartbeat_timeout_ms(n, 1),
            wp_manager_config_set_shutdown_grace_ms(n, 1),
            wp_manager_config_set_reconnect_grace_ms(n, 1),
            wp_manager_config_set_metrics_address(n, s),
            wp_manager_config_set_result_output_limit(n, 1),
            wp_manager_config_add_submitter_certificate_pem_file(n, s),
            wp_manager_config_add_submitter_ca_pem_file(n, s),
            wp_manager_config_set_journal(n, s),
            wp_manager_config_set_journal_retention(n, 1, 1),
        ] {
            assert_eq!(r, WP_RESULT_NULL_PARAMETER);
        }
        let wn: *mut wp_worker_config = ptr::null_mut();
        for r in [
            wp_worker_config_set_platform(wn, s),
            wp_worker_config_set_work_dir(wn, s),
            wp_worker_config_set_connect_timeout_ms(wn, 1),
            wp_worker_config_set_backoff_initial_ms(wn, 1),
            wp_worker_config_set_backoff_max_ms(wn, 1),
            wp_worker_config_set_kill_grace_ms(wn, 1),
            wp_worker_config_set_reconnect_buffer(wn, 1),
        ] {
            assert_eq!(r, WP_RESULT_NULL_PARAMETER);
        }
        // Specs.
        let sp: *mut wp_job_spec = ptr::null_mut();
        for r in [
            wp_job_spec_new(ptr::null(), ptr::null_mut()),
            wp_job_spec_new(s, ptr::null_mut()),
            wp_job_spec_set_timeout_ms(sp, 1),
            wp_job_spec_set_kill_grace_ms(sp, 1),
            wp_job_spec_add_env(sp, s, s),
            wp_job_spec_set_stdin(sp, ptr::null(), 0),
            wp_job_spec_require_tag(sp, s),
            wp_job_spec_require_platform(sp, s),
            wp_job_spec_set_priority(sp, 1),
            wp_job_spec_set_retries(sp, 1),
            wp_job_spec_set_interactive(sp, true),
            wp_job_spec_set_pty(sp, 1, 1),
            wp_job_spec_validate(sp),
        ] {
            assert_eq!(r, WP_RESULT_NULL_PARAMETER);
        }
        assert_eq!(wp_job_spec_wire_size(sp), 0);
        // Managers.
        let m: *const wp_manager = ptr::null();
        for r in [
            wp_manager_submit_spec(m, ptr::null(), ptr::null_mut()),
            wp_manager_cancel(m, 1),
            wp_manager_job_status(m, 1, ptr::null_mut()),
            wp_manager_jobs(m, ptr::null_mut()),
            wp_manager_workers(m, ptr::null_mut()),
            wp_manager_stats(m, ptr::null_mut()),
            wp_manager_subscribe(m, ptr::null_mut()),
            wp_manager_shutdown(m),
            wp_manager_shutdown_within(m, 0),
        ] {
            assert_eq!(r, WP_RESULT_NULL_PARAMETER);
        }
        assert_eq!(wp_manager_metrics_port(m), 0);
        // Workers.
        let w: *const wp_worker = ptr::null();
        for r in [
            wp_worker_drain(w),
            wp_worker_drain_within(w, 0),
            wp_worker_wait(w, 0),
            wp_worker_stop(w),
        ] {
            assert_eq!(r, WP_RESULT_NULL_PARAMETER);
        }
        assert!(wp_worker_name(w).is_null());
        assert!(!wp_worker_is_connected(w));
        assert_eq!(
            (wp_worker_sessions(w), wp_worker_connection_attempts(w)),
            (0, 0)
        );
        // Jobs and what they give.
        let mut result = ptr::null_mut();
        assert_eq!(
            wp_job_wait(ptr::null_mut(), &mut result),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(
            wp_job_wait_timeout(ptr::null_mut(), 0, &mut result),
            WP_RESULT_NULL_PARAMETER
        );
        assert!(result.is_null());
        let r: *const wp_job_result = ptr::null();
        assert_eq!(wp_job_result_id(r), 0);
        assert_eq!(wp_job_result_outcome(r), wp_outcome::WP_OUTCOME_NONE);
        assert_eq!(
            (wp_job_result_exit_code(r), wp_job_result_signal(r)),
            (-1, 0)
        );
        assert!(wp_job_result_reason(r).is_null() && wp_job_result_worker(r).is_null());
        let (o, e) = (wp_job_result_stdout(r), wp_job_result_stderr(r));
        assert!(o.data.is_null() && o.len == 0 && e.data.is_null() && e.len == 0);
        assert!(!wp_job_result_truncated(r));
        assert_eq!(wp_job_result_attempts(r), 0);
        assert_eq!(wp_job_result_warning_count(r), 0);
        assert!(wp_job_result_warning(r, 0).is_null());
        let st: *const wp_job_status = ptr::null();
        assert_eq!(wp_job_status_id(st), 0);
        assert_eq!(wp_job_status_state(st), wp_job_state::WP_JOB_STATE_NONE);
        assert!(wp_job_status_worker(st).is_null() && wp_job_status_script(st).is_null());
        assert_eq!(
            (
                wp_job_status_since_ms(st),
                wp_job_status_attempt(st),
                wp_job_status_priority(st)
            ),
            (0, 0, 0)
        );
        assert!(!wp_job_status_output_paused(st));
        assert_eq!(wp_job_list_len(ptr::null()), 0);
        assert!(wp_job_list_get(ptr::null(), 0).is_null());
        // Pool snapshots and events.
        let info: *const wp_worker_info = ptr::null();
        assert_eq!(wp_worker_info_id(info), 0);
        assert!(wp_worker_info_name(info).is_null());
        assert!(wp_worker_info_address(info).is_null());
        assert!(wp_worker_info_platform(info).is_null());
        assert!(wp_worker_info_tag(info, 0).is_null());
        assert_eq!(wp_worker_info_tag_count(info), 0);
        assert_eq!(
            (wp_worker_info_slots(info), wp_worker_info_running(info)),
            (0, 0)
        );
        assert!(!wp_worker_info_draining(info));
        assert_eq!(wp_worker_list_len(ptr::null()), 0);
        assert!(wp_worker_list_get(ptr::null(), 0).is_null());
        let mut figures = std::mem::MaybeUninit::<wp_stats_figures>::uninit();
        assert_eq!(
            wp_stats_get(ptr::null(), figures.as_mut_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        let mut ws = std::mem::MaybeUninit::<wp_worker_stats>::uninit();
        assert_eq!(
            wp_stats_worker(ptr::null(), 0, ws.as_mut_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        assert_eq!(wp_stats_worker_count(ptr::null()), 0);
        assert!(wp_stats_prometheus(ptr::null()).is_null());
        let mut pe = std::mem::MaybeUninit::<wp_manager_event>::uninit();
        assert_eq!(
            wp_subscription_next(ptr::null_mut(), 0, pe.as_mut_ptr()),
            WP_RESULT_NULL_PARAMETER
        );
        // Every _free takes NULL.
        wp_job_spec_free(ptr::null_mut());
        wp_job_result_free(ptr::null_mut());
        wp_job_status_free(ptr::null_mut());
        wp_job_list_free(ptr::null_mut());
        wp_worker_list_free(ptr::null_mut());
        wp_stats_free(ptr::null_mut());
        wp_subscription_free(ptr::null_mut());
    }
}

#[test]
fn setters_refuse_out_of_range_values_with_a_reason_and_keep_what_they_had() {
    use wp_result::*;
    let c = |s: &str| CString::new(s).unwrap();
    // Each call is refused, with a message that says why.
    macro_rules! refused {
        ($call:expr, $why:expr $(,)?) => {{
            assert_eq!($call, WP_RESULT_INVALID_ARGUMENT, "{}", $why);
            let e = last_error();
            assert!(e.contains($why), "{e} lacks {:?}", $why);
        }};
    }
    // SAFETY: every pointer passed is a live CString, a live local, or a handle returned
    // by the library and freed once.
    unsafe {
        let mut spec = ptr::null_mut();
        assert_eq!(wp_job_spec_new(c("true").as_ptr(), &mut spec), WP_RESULT_OK);
        let size = wp_job_spec_wire_size(spec);
        let year_ms = 365 * 86_400 * 1000;
        refused!(
            wp_job_spec_set_timeout_ms(spec, 0),
            "a timeout must be 1 to"
        );
        refused!(
            wp_job_spec_set_timeout_ms(spec, year_ms + 1),
            "a timeout must be 1 to",
        );
        refused!(
            wp_job_spec_set_kill_grace_ms(spec, u64::MAX),
            "a kill grace must be 0 to",
        );
        refused!(
            wp_job_spec_add_env(spec, c("").as_ptr(), c("v").as_ptr()),
            "not a valid environment variable name",
        );
        refused!(
            wp_job_spec_add_env(spec, c("WORKPOOL_JOB_ID").as_ptr(), c("v").as_ptr()),
            "set by the worker",
        );
        refused!(wp_job_spec_require_tag(spec, c("a\tb").as_ptr()), "a tag",);
        refused!(
            wp_job_spec_require_platform(spec, c("").as_ptr()),
            "a platform must have 1 to",
        );
        refused!(
            wp_job_spec_set_stdin(spec, [0u8].as_ptr(), usize::MAX),
            "more than a job may hold",
        );
        // Nothing refused was taken.
        assert_eq!(wp_job_spec_wire_size(spec), size);
        assert_eq!(wp_job_spec_validate(spec), WP_RESULT_OK);
        // Binary stdin is taken as given, NUL bytes included; a zero length clears it.
        let bytes = [0u8, 1, 0, 255];
        assert_eq!(
            wp_job_spec_set_stdin(spec, bytes.as_ptr(), bytes.len()),
            WP_RESULT_OK
        );
        assert_eq!(wp_job_spec_wire_size(spec), size + 4);
        assert_eq!(wp_job_spec_set_stdin(spec, ptr::null(), 0), WP_RESULT_OK);
        assert_eq!(wp_job_spec_wire_size(spec), size);
        wp_job_spec_free(spec);
        let mut blank = ptr::null_mut();
        assert_eq!(
            wp_job_spec_new(c(" \n").as_ptr(), &mut blank),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert!(blank.is_null());

        let mut mc = ptr::null_mut();
        assert_eq!(wp_manager_config_new(&mut mc), WP_RESULT_OK);
        refused!(
            wp_manager_config_set_queue_capacity(mc, 0),
            "queue_capacity"
        );
        refused!(
            wp_manager_config_set_heartbeat_interval_ms(mc, 600_001),
            "heartbeat interval must be 1 to 600000 ms",
        );
        refused!(
            wp_manager_config_set_heartbeat_timeout_ms(mc, 0),
            "heartbeat timeout must be 1 to 600000 ms",
        );
        refused!(
            wp_manager_config_set_shutdown_grace_ms(mc, year_ms + 1),
            "shutdown grace must be 0 to",
        );
        refused!(
            wp_manager_config_set_reconnect_grace_ms(mc, u64::MAX),
            "reconnect grace must be 0 to",
        );
        refused!(
            wp_manager_config_set_metrics_address(mc, c("9100").as_ptr()),
            "not a HOST:PORT address",
        );
        // Settings that each pass but do not work together are refused at the start.
        let dir = scratch("c-setters");
        Certs::new(1).write_to(&dir);
        let file = |f: &str| c(dir.join(f).to_str().unwrap());
        let (cert, key) = (file("host-cert.pem"), file("host-key.pem"));
        assert_eq!(
            wp_manager_config_set_identity_pem_files(mc, cert.as_ptr(), key.as_ptr()),
            WP_RESULT_OK
        );
        assert_eq!(
            wp_manager_config_set_listen(mc, c("127.0.0.1:0").as_ptr()),
            WP_RESULT_OK
        );
        assert_eq!(
            wp_manager_config_set_heartbeat_interval_ms(mc, 5000),
            WP_RESULT_OK
        );
        assert_eq!(
            wp_manager_config_set_heartbeat_timeout_ms(mc, 1000),
            WP_RESULT_OK
        );
        let mut m = ptr::null_mut();
        assert_eq!(wp_manager_start(mc, &mut m), WP_RESULT_INVALID_ARGUMENT);
        assert!(
            last_error().contains("heartbeat_timeout"),
            "{}",
            last_error()
        );
        assert!(m.is_null());
        wp_manager_config_free(mc);

        let mut wc = ptr::null_mut();
        assert_eq!(wp_worker_config_new(&mut wc), WP_RESULT_OK);
        refused!(
            wp_worker_config_set_platform(wc, c("linux\x1b[2J").as_ptr()),
            "a platform",
        );
        refused!(
            wp_worker_config_set_work_dir(wc, cert.as_ptr()),
            "is not a folder",
        );
        refused!(
            wp_worker_config_set_connect_timeout_ms(wc, 0),
            "connect timeout must be 1 to",
        );
        refused!(
            wp_worker_config_set_backoff_max_ms(wc, year_ms + 1),
            "longest reconnect wait must be 1 to",
        );
        refused!(
            wp_worker_config_set_kill_grace_ms(wc, u64::MAX),
            "kill grace must be 0 to",
        );
        refused!(wp_worker_config_add_tag(wc, c("").as_ptr()), "a tag");
        // A first backoff longer than the longest is refused when the worker starts.
        let (wcert, wkey) = (file("worker-0-cert.pem"), file("worker-0-key.pem"));
        assert_eq!(
            wp_worker_config_set_identity_pem_files(wc, wcert.as_ptr(), wkey.as_ptr()),
            WP_RESULT_OK
        );
        assert_eq!(
            wp_worker_config_set_manager(wc, c("127.0.0.1").as_ptr(), 9),
            WP_RESULT_OK
        );
        assert_eq!(
            wp_worker_config_set_backoff_initial_ms(wc, 2000),
            WP_RESULT_OK
        );
        assert_eq!(wp_worker_config_set_backoff_max_ms(wc, 1000), WP_RESULT_OK);
        let mut w = ptr::null_mut();
        assert_eq!(wp_worker_start(wc, &mut w), WP_RESULT_INVALID_ARGUMENT);
        assert!(last_error().contains("backoff_initial"), "{}", last_error());
        assert!(w.is_null());
        wp_worker_config_free(wc);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// What the test's log callbacks saw: (level, target, message), and the result of a
/// `wp_set_log_callback` made from inside the callback.
#[derive(Default)]
struct Seen {
    records: std::sync::Mutex<Vec<(wp_log_level, String, String)>>,
    nested: std::sync::Mutex<Option<wp_result>>,
}

unsafe extern "C" fn remember(userdata: *mut std::ffi::c_void, record: *const wp_log_record) {
    // SAFETY: `userdata` is the `Seen` the test passed, alive until logging is turned off;
    // `record` and its strings are valid during the call.
    let (seen, record) = unsafe { (&*(userdata as *const Seen), &*record) };
    // SAFETY: the strings of a record are NUL-terminated and valid during the call.
    let (target, message) = unsafe {
        (
            std::ffi::CStr::from_ptr(record.target)
                .to_string_lossy()
                .into_owned(),
            std::ffi::CStr::from_ptr(record.message)
                .to_string_lossy()
                .into_owned(),
        )
    };
    if target.starts_with("c_abi_test") {
        if message == "nest" {
            // SAFETY: passing NULL turns logging off; it is refused here anyway.
            let r = unsafe { wp_set_log_callback(None, ptr::null_mut(), 0) };
            *seen.nested.lock().unwrap() = Some(r);
        }
        seen.records
            .lock()
            .unwrap()
            .push((record.level, target, message));
    }
}

#[test]
fn the_log_callback_gets_every_record_from_any_thread_and_is_never_called_once_replaced() {
    use wp_result::*;
    let (first, second) = (Seen::default(), Seen::default());
    let data = |s: &Seen| s as *const Seen as *mut std::ffi::c_void;
    // SAFETY: the callback and its `Seen` stay valid until logging is turned off below.
    unsafe {
        assert_eq!(
            wp_set_log_callback(Some(remember), data(&first), 6),
            WP_RESULT_INVALID_ARGUMENT
        );
        assert!(last_error().contains("not a log level"), "{}", last_error());
        assert_eq!(
            wp_set_log_callback(
                Some(remember),
                data(&first),
                wp_log_level::WP_LOG_DEBUG as u32
            ),
            WP_RESULT_OK
        );
    }
    // Records from several threads at once, at every level.
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                log::error!(target: "c_abi_test", "error from thread {i}");
                log::info!(target: "c_abi_test", "info from thread {i}");
                log::debug!(target: "c_abi_test", "debug from thread {i}");
                log::trace!(target: "c_abi_test", "trace from thread {i}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    log::info!(target: "c_abi_test", "nest");
    let got = first.records.lock().unwrap().clone();
    for i in 0..4 {
        for (level, text) in [
            (wp_log_level::WP_LOG_ERROR, "error"),
            (wp_log_level::WP_LOG_INFO, "info"),
            (wp_log_level::WP_LOG_DEBUG, "debug"),
        ] {
            let want = (
                level,
                "c_abi_test".to_string(),
                format!("{text} from thread {i}"),
            );
            assert!(got.contains(&want), "missing {want:?} in {got:?}");
        }
    }
    // Below the level: not delivered.
    assert!(!got.iter().any(|r| r.2.starts_with("trace")), "{got:?}");
    // From inside the callback, the callback cannot be changed (nor deadlock).
    assert_eq!(*first.nested.lock().unwrap(), Some(WP_RESULT_LOGGER_IN_USE));
    // Replaced: the first callback is never called again.
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            wp_set_log_callback(
                Some(remember),
                data(&second),
                wp_log_level::WP_LOG_INFO as u32
            ),
            WP_RESULT_OK
        );
    }
    let before = first.records.lock().unwrap().len();
    log::warn!(target: "c_abi_test", "after the change");
    log::debug!(target: "c_abi_test", "below the new level");
    assert_eq!(first.records.lock().unwrap().len(), before);
    assert_eq!(
        *second.records.lock().unwrap(),
        vec![(
            wp_log_level::WP_LOG_WARN,
            "c_abi_test".to_string(),
            "after the change".to_string()
        )]
    );
    // Off: nobody is called.
    // SAFETY: NULL turns logging off.
    unsafe {
        assert_eq!(
            wp_set_log_callback(None, ptr::null_mut(), wp_log_level::WP_LOG_TRACE as u32),
            WP_RESULT_OK
        );
    }
    log::error!(target: "c_abi_test", "after off");
    assert_eq!(second.records.lock().unwrap().len(), 1);
}

#[test]
fn every_function_of_the_header_says_who_owns_what_and_which_threads_may_call_it() {
    let header = std::fs::read_to_string(root().join("include/workpool.h")).unwrap();
    let mut comment = String::new();
    let mut declaration = String::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    for line in header.lines() {
        if let Some(text) = line.strip_prefix("//") {
            comment.push_str(text);
            comment.push(' ');
            continue;
        }
        let starts = line.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && !line.starts_with("typedef")
            && line.contains("wp_")
            && line.contains('(');
        if starts || !declaration.is_empty() {
            declaration.push_str(line);
            if !line.trim_end().ends_with(';') {
                continue;
            }
            let open = declaration.find('(').unwrap();
            let name = declaration[..open]
                .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap()
                .to_string();
            let returns_pointer = declaration[..open].contains('*');
            let has_out = declaration.contains("**out");
            if name.ends_with("_free") {
                if !comment.contains("once") {
                    problems.push(format!("{name}: does not say it is called once"));
                }
            } else if !comment.contains("Threads") {
                problems.push(format!("{name}: does not say which threads may call it"));
            }
            if (returns_pointer || has_out)
                && !["Ownership", "owned", "static"]
                    .iter()
                    .any(|w| comment.contains(w))
            {
                problems.push(format!("{name}: does not say who owns what it returns"));
            }
            checked += 1;
            declaration.clear();
        }
        comment.clear();
    }
    assert!(checked > 100, "only {checked} functions found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn one_manager_serves_several_threads_at_once_through_the_c_api() {
    use wp_result::*;
    // What the header promises to share between threads is Sync (checked when this
    // compiles); what it gives to one thread at a time may move between threads.
    fn shared<T: Sync + Send>() {}
    fn moved<T: Send>() {}
    shared::<wp_manager>();
    shared::<wp_worker>();
    shared::<wp_stats>();
    shared::<wp_job_list>();
    shared::<wp_worker_list>();
    shared::<wp_job_result>();
    shared::<wp_job_status>();
    moved::<wp_job>();
    moved::<wp_subscription>();
    moved::<wp_job_spec>();
    moved::<wp_manager_config>();
    moved::<wp_worker_config>();

    let dir = scratch("c-threads");
    Certs::new(1).write_to(&dir);
    // SAFETY: the folder holds the certificates the manager loads.
    let m = unsafe { admission_manager(&dir, 10_000, 256, 8) };
    let address = m as usize;
    const THREADS: u64 = 4;
    const JOBS: u64 = 25;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let m = address as *const wp_manager;
                let script = CString::new(format!("echo {t}")).unwrap();
                let tag = CString::new("no worker has this").unwrap();
                // SAFETY: `m` stays live until every thread is joined; every other pointer
                // is a live CString, a live local, or a handle made here and freed once.
                unsafe {
                    let mut spec = ptr::null_mut();
                    assert_eq!(wp_job_spec_new(script.as_ptr(), &mut spec), WP_RESULT_OK);
                    assert_eq!(wp_job_spec_require_tag(spec, tag.as_ptr()), WP_RESULT_OK);
                    for _ in 0..JOBS {
                        let mut job = ptr::null_mut();
                        assert_eq!(wp_manager_submit_spec(m, spec, &mut job), WP_RESULT_OK);
                        let id = wp_job_id(job);
                        let mut status = ptr::null_mut();
                        assert_eq!(wp_manager_job_status(m, id, &mut status), WP_RESULT_OK);
                        assert_eq!(
                            wp_job_status_state(status),
                            wp_job_state::WP_JOB_STATE_QUEUED
                        );
                        wp_job_status_free(status);
                        let (mut stats, mut jobs) = (ptr::null_mut(), ptr::null_mut());
                        assert_eq!(wp_manager_stats(m, &mut stats), WP_RESULT_OK);
                        assert_eq!(wp_manager_jobs(m, &mut jobs), WP_RESULT_OK);
                        assert!(wp_job_list_len(jobs) >= 1);
                        wp_job_list_free(jobs);
                        wp_stats_free(stats);
                        assert_eq!(wp_manager_cancel(m, id), WP_RESULT_OK);
                        let mut result = ptr::null_mut();
                        assert_eq!(wp_job_wait_timeout(job, 60_000, &mut result), WP_RESULT_OK);
                        assert_eq!(
                            wp_job_result_outcome(result),
                            wp_outcome::WP_OUTCOME_CANCELLED
                        );
                        wp_job_result_free(result);
                        wp_job_free(job);
                    }
                    wp_job_spec_free(spec);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // SAFETY: `m` is live; every thread that used it has been joined.
    unsafe {
        let mut stats = ptr::null_mut();
        assert_eq!(wp_manager_stats(m, &mut stats), WP_RESULT_OK);
        let mut f = std::mem::MaybeUninit::<wp_stats_figures>::uninit();
        assert_eq!(wp_stats_get(stats, f.as_mut_ptr()), WP_RESULT_OK);
        let f = f.assume_init();
        assert_eq!(f.jobs_submitted, THREADS * JOBS);
        assert_eq!(f.jobs_cancelled, THREADS * JOBS);
        assert_eq!(f.jobs_queued, 0);
        wp_stats_free(stats);
        wp_manager_free(m);
    }
    std::fs::remove_dir_all(dir).unwrap();
}
