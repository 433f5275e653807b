//! A worker behind NAT: in a network namespace of its own, routed through a second
//! namespace that masquerades its traffic, it dials out to a manager that lives in a
//! third namespace and takes work, while the manager cannot reach it at all. Needs root,
//! `ip` and `iptables`; without them it fails under `CI=true` (which installs them) and
//! elsewhere says loudly why it is skipped. Everything happens
//! inside namespaces this test creates: none of them has a route anywhere else, and the
//! machine's own namespace is not touched.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;
use workpool::job::JobSpec;
use workpool::manager::{Manager, ManagerConfig, ManagerEvent};
use workpool::tls::{Identity, TrustRoots, generate_self_signed};

const MANAGER_IP: &str = "10.231.1.1";
const ROUTER_PUBLIC_IP: &str = "10.231.1.2";
const WORKER_IP: &str = "10.231.2.2";

/// The namespaces of one test (links die with them); removed on drop.
struct Nat {
    manager: String,
    router: String,
    worker: String,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Nat {
    fn setup() -> Result<Nat, String> {
        let id = std::process::id() % 100_000;
        let nat = Nat {
            manager: format!("wpnat-m-{id}"),
            router: format!("wpnat-r-{id}"),
            worker: format!("wpnat-w-{id}"),
        };
        let (m, r, w) = (
            nat.manager.as_str(),
            nat.router.as_str(),
            nat.worker.as_str(),
        );
        for ns in [m, r, w] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        // manager <-> router ("the internet"), router <-> worker (the private network).
        sh(&[
            "ip", "-n", m, "link", "add", "pub0", "type", "veth", "peer", "name", "pub1", "netns",
            r,
        ])?;
        sh(&[
            "ip", "-n", r, "link", "add", "priv0", "type", "veth", "peer", "name", "priv1",
            "netns", w,
        ])?;
        sh(&[
            "ip",
            "-n",
            m,
            "addr",
            "add",
            &format!("{MANAGER_IP}/24"),
            "dev",
            "pub0",
        ])?;
        sh(&[
            "ip",
            "-n",
            r,
            "addr",
            "add",
            &format!("{ROUTER_PUBLIC_IP}/24"),
            "dev",
            "pub1",
        ])?;
        sh(&[
            "ip",
            "-n",
            r,
            "addr",
            "add",
            "10.231.2.1/24",
            "dev",
            "priv0",
        ])?;
        sh(&[
            "ip",
            "-n",
            w,
            "addr",
            "add",
            &format!("{WORKER_IP}/24"),
            "dev",
            "priv1",
        ])?;
        for (ns, dev) in [(m, "pub0"), (r, "pub1"), (r, "priv0"), (w, "priv1")] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        sh(&[
            "ip",
            "-n",
            w,
            "route",
            "add",
            "default",
            "via",
            "10.231.2.1",
        ])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            r,
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "pub1",
            "-j",
            "MASQUERADE",
        ])?;
        Ok(nat)
    }

    /// Moves the calling thread into the manager's namespace: sockets it makes from now
    /// on live there.
    fn enter_manager_side(&self) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.manager)).unwrap();
        assert_eq!(
            // SAFETY: `f` is an open descriptor of a network namespace file for the duration of the call.
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        for ns in [&self.worker, &self.router, &self.manager] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables"] {
        if !have_tool(tool) {
            return Some(format!("no `{tool}` on this machine"));
        }
    }
    None
}

#[test]
fn a_worker_behind_nat_dials_out_and_runs_jobs_though_the_manager_cannot_reach_it() {
    const TEST: &str = "the NAT test";
    if let Some(why) = skip_reason() {
        return missing_prerequisite(TEST, &why);
    }
    let nat = match Nat::setup() {
        Ok(n) => n,
        Err(e) => {
            return missing_prerequisite(
                TEST,
                &format!("network namespaces are not available here: {e}"),
            );
        }
    };
    let dir = scratch("nat");
    let host = generate_self_signed(&[MANAGER_IP]).unwrap();
    let worker = generate_self_signed(&["behind-nat"]).unwrap();
    std::fs::write(dir.join("host-cert.pem"), &host.cert_pem).unwrap();
    std::fs::write(dir.join("worker-0-cert.pem"), &worker.cert_pem).unwrap();
    std::fs::write(dir.join("worker-0-key.pem"), &worker.key_pem).unwrap();
    // The manager side runs on a thread that lives in the manager's namespace.
    let nat = std::sync::Arc::new(nat);
    let n = nat.clone();
    let d = dir.clone();
    std::thread::spawn(move || {
        n.enter_manager_side();
        manager_side(&n, &d, &host, &worker);
    })
    .join()
    .unwrap();
    drop(nat);
    std::fs::remove_dir_all(dir).unwrap();
}

fn manager_side(
    nat: &Nat,
    dir: &std::path::Path,
    host: &workpool::tls::GeneratedCertificate,
    worker: &workpool::tls::GeneratedCertificate,
) {
    let manager = Manager::bind(ManagerConfig::new(
        format!("{MANAGER_IP}:0"),
        Identity::from_pem(host.cert_pem.as_bytes(), host.key_pem.as_bytes()).unwrap(),
        TrustRoots::from_pem(worker.cert_pem.as_bytes()).unwrap(),
    ))
    .unwrap();
    let pool = manager.subscribe();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &nat.worker])
        .arg(std::env::current_exe().unwrap())
        .args([
            "worker_process_helper",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("WP_HELPER_PORT", manager.local_addr().port().to_string())
        .env("WP_HELPER_HOST", MANAGER_IP)
        .env("WP_HELPER_DIR", dir)
        .env("WP_HELPER_NAME", "behind-nat")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let joined = match pool.recv_timeout(DEADLINE) {
        Ok(ManagerEvent::WorkerJoined(info)) => info,
        other => panic!("the worker behind NAT did not join: {other:?}"),
    };
    // The manager sees the router's public address: the worker's own is hidden.
    assert_eq!(joined.address.unwrap().ip().to_string(), ROUTER_PUBLIC_IP);
    // And it has no route to the worker's network (the attempt fails locally).
    let probe = std::net::TcpStream::connect_timeout(
        &format!("{WORKER_IP}:9").parse().unwrap(),
        Duration::from_secs(2),
    );
    let err = probe.expect_err("the manager reached the worker directly");
    assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{err}");
    let r = run(&manager, JobSpec::new("echo from behind the NAT"));
    assert_eq!(r.outcome, exited(0));
    assert_eq!(r.stdout_text(), "from behind the NAT\n");
    let _ = child.kill();
    let _ = child.wait();
}

/// Not a test on its own: the body of the worker process in the NAT namespace.
#[test]
#[ignore]
fn worker_process_helper() {
    worker_process_main();
}
