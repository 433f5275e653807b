//! The benchmark's modes run end to end, so that they cannot rot. No figure is judged
//! here: speed is reported in docs/PERFORMANCE.md, not asserted.

mod common;

use common::{have_tool, missing_prerequisite};
use std::path::PathBuf;
use std::process::Command;

fn bench() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bench = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/bench");
    assert!(bench.exists(), "cargo test builds the examples first");
    bench
}

/// Runs the benchmark with `args` and `--json`; returns its table and its rows.
fn run(name: &str, args: &[&str]) -> (String, Vec<serde_json::Value>) {
    let json =
        std::env::temp_dir().join(format!("workpool-bench-{name}-{}.json", std::process::id()));
    let out = Command::new(bench())
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(json).unwrap();
    for r in &rows {
        assert!(r["value"].as_str().is_some_and(|v| !v.is_empty()), "{r}");
        if let Some(x) = r["ratio"].as_f64() {
            assert!(x.is_finite() && x > 0.0, "{r}");
        }
    }
    (table, rows)
}

fn metrics(rows: &[serde_json::Value]) -> Vec<&str> {
    rows.iter().map(|r| r["metric"].as_str().unwrap()).collect()
}

#[test]
fn the_quick_benchmark_runs_every_scenario_and_writes_json() {
    // The journal scenario keeps its journals where it is told, and takes them away.
    let journals =
        std::env::temp_dir().join(format!("workpool-bench-journals-{}", std::process::id()));
    std::fs::create_dir_all(&journals).unwrap();
    let (table, rows) = run(
        "quick",
        &["--quick", "--journal-dir", journals.to_str().unwrap()],
    );
    let left: Vec<_> = std::fs::read_dir(&journals).unwrap().collect();
    assert!(left.is_empty(), "left in {}: {left:?}", journals.display());
    std::fs::remove_dir(&journals).unwrap();
    assert!(table.contains("(journal on "), "{table}");
    for scenario in [
        "1 throughput",
        "2 latency",
        "3 streaming",
        "4 scale",
        "5 queue",
        "7 journal",
    ] {
        assert!(table.contains(scenario), "no {scenario} row in:\n{table}");
    }
    assert!(rows.len() >= 14, "{table}");
    assert!(table.contains("| manager | wp-link |"), "{table}");
}

/// `--workers` spreads the workers over processes of `--per-process` each, reports each
/// size, and refuses a size whose threads cannot fit under `kernel.pid_max`, saying so.
#[test]
fn the_scale_mode_spreads_workers_over_processes_and_names_the_limit_it_hits() {
    let pid_max: usize = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let too_many = pid_max.to_string();
    let (table, rows) = run(
        "workers",
        &[
            "--quick",
            "--workers",
            &format!("3,{too_many}"),
            "--per-process",
            "2",
        ],
    );
    let m = metrics(&rows);
    assert!(m.contains(&"3 workers in 2 processes join"), "{table}");
    let threads = rows
        .iter()
        .find(|r| r["metric"] == "threads (and fds) per connection, 3 workers")
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        threads["value"].as_str().unwrap().starts_with("manager "),
        "{table}"
    );
    let refused = rows
        .iter()
        .find(|r| r["metric"] == format!("{too_many} workers").as_str())
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(refused["value"], "not run", "{table}");
    assert!(
        refused["baseline"]
            .as_str()
            .unwrap()
            .contains("kernel.pid_max"),
        "{table}"
    );
}

/// `--instructions` counts a manager process and a worker process under callgrind.
#[test]
fn the_instruction_count_mode_counts_a_manager_and_a_worker_process() {
    if !have_tool("valgrind") {
        return missing_prerequisite(
            "the_instruction_count_mode_counts_a_manager_and_a_worker_process",
            "valgrind is not installed",
        );
    }
    let (table, rows) = run("instructions", &["--instructions", "--jobs", "4,12"]);
    assert_eq!(rows.len(), 3, "{table}");
    for r in &rows {
        assert_eq!(r["scenario"], "6 instructions", "{table}");
        let v = r["value"].as_str().unwrap();
        let k: f64 = v.strip_suffix(" k").unwrap().parse().unwrap();
        assert!(k.is_finite(), "{table}");
    }
}

#[test]
fn the_benchmark_refuses_an_unknown_argument() {
    let out = Command::new(bench()).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument \"--bogus\""));
}
