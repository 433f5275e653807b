//! The benchmark's quick mode runs end to end, so that it cannot rot. No figure is judged
//! here: speed is reported in docs/PERFORMANCE.md, not asserted.

use std::process::Command;

#[test]
fn the_quick_benchmark_runs_every_scenario_and_writes_json() {
    let exe = std::env::current_exe().unwrap();
    let bench = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/bench");
    assert!(bench.exists(), "cargo test builds the examples first");
    let json = std::env::temp_dir().join(format!("workpool-bench-{}.json", std::process::id()));
    let out = Command::new(&bench)
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for scenario in [
        "1 throughput",
        "2 latency",
        "3 streaming",
        "4 scale",
        "5 queue",
    ] {
        assert!(table.contains(scenario), "no {scenario} row in:\n{table}");
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(rows.len() >= 10);
    for r in &rows {
        assert!(r["value"].as_str().is_some_and(|v| !v.is_empty()), "{r}");
        if let Some(x) = r["ratio"].as_f64() {
            assert!(x.is_finite() && x > 0.0, "{r}");
        }
    }
    std::fs::remove_file(json).unwrap();
}
