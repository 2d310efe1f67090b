//! Smoke runs of the simulator's commands, so they cannot rot. They check
//! that every phase runs and reports, not how fast: timing belongs to the
//! benchmark itself.

use std::process::Command;

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hexfleet-sim"))
}

#[test]
fn the_benchmark_runs_every_phase_and_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let markdown = dir.path().join("BENCHMARKS.md");
    let out = sim()
        .args(["bench", "--smoke", "--json"])
        .arg(&json)
        .arg("--markdown")
        .arg(&markdown)
        .env("HEXFLEET_DEV_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let number = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{v} in {report}"));
    // Costs per operation come from real readings.
    let ingest = &report["ingest"];
    assert!(number(&ingest["window"]["fixes_per_s"]) > 0.0);
    assert!(number(&ingest["node_us_per_fix"]) > 0.0);
    assert!(number(&ingest["redis_us_per_fix"]) > 0.0);
    // A fix is a datagram in, and its acknowledgement out.
    assert!(number(&ingest["datagrams_per_fix"]) >= 1.0, "{report}");
    assert!(number(&ingest["bytes_in_per_fix"]) > 0.0);
    assert!(
        report["nearby"][0]["requests"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(number(&report["nearby"][0]["p50_ms"]) > 0.0);
    let latency = &report["latency"][0];
    assert!(number(&latency["p50_ms"]) > 0.0, "{report}");
    assert!(number(&report["fanout"]["window"]["delta_items_per_s"]) > 0.0);
    assert_eq!(report["fanout"]["bytes_per_moved_record"], 14);
    let idle = &report["idle"];
    assert_eq!(idle["connected"], 50, "{report}");
    assert_eq!(idle["connect_errors"], 0, "{report}");
    assert!(idle["rss_after_kib"].as_u64().unwrap() > 0);
    assert!(number(&idle["handshake_p99_ms"]) > 0.0);
    assert!(number(&report["capacity"]["fixes_per_core_s"]) > 0.0);
    assert_eq!(report["zones"][0]["zones"], 0, "{report}");
    let zones = &report["zones"][1];
    assert_eq!(zones["zones"], 10, "{report}");
    assert!(number(&zones["node_us_per_fix"]) > 0.0, "{report}");
    assert!(number(&zones["zone_cells"]) > 0.0, "{report}");
    let dashboards = &report["dashboards"];
    assert_eq!(dashboards["dashboards"], 10, "{report}");
    assert!(number(&dashboards["city"]["items_per_s"]) > 0.0, "{report}");
    // Twenty drivers over a city leave most districts empty.
    assert_eq!(dashboards["district"]["connected"], 5, "{report}");
    let table = std::fs::read_to_string(&markdown).unwrap();
    for row in [
        "node CPU per accepted fix",
        "Redis CPU per fix",
        "UDP datagrams per fix",
        "nearby query",
        "node CPU per delta item",
        "memory per idle driver connection",
        "node CPU per idle connection",
        "One core of the node",
        "fix created → rider applied",
        "memory per dashboard",
        "district dashboard",
        "fix → event in the stream",
    ] {
        assert!(table.contains(row), "{row} missing from:\n{table}");
    }
}

/// Runs the demo for 4 s on free loopback ports with `args`; its stdout.
fn demo(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = sim()
        .args(["demo", "--duration", "4s"])
        .args(args)
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--quic-listen",
            "127.0.0.1:0",
        ])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("HEXFLEET_DEV_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_demo_runs_a_node_drivers_and_riders_and_summarises() {
    let stdout = demo(&["--drivers", "20", "--riders", "5"]);
    for line in [
        "HTTP    http://127.0.0.1:",
        "dashboard  http://127.0.0.1:",
        "/?token=eyJ",
        "| drivers | 20 connected of 20 |",
        "| accepted |",
        "| delta items |",
    ] {
        assert!(stdout.contains(line), "{line} missing from:\n{stdout}");
    }
    // What the node accepted, though it acknowledges every 30 s and the
    // run lasts 4: each driver asks at the end. Loopback loses nothing but
    // the odd datagram.
    let sent = leading_number(&stdout, "| fixes sent | ");
    let accepted = leading_number(&stdout, "| accepted | ");
    assert!(
        sent > 20 && accepted >= sent * 95 / 100,
        "accepted {accepted} of {sent}:\n{stdout}"
    );
}

/// Half the phones' clocks wrong by 20 s to a day: the node puts their
/// fixes in its own clock, losing the first of each (4 of a phone's 4 or 5
/// here), where before it refused them all.
#[test]
fn the_demo_with_wrong_phone_clocks_has_their_fixes_accepted() {
    let stdout = demo(&[
        "--drivers",
        "20",
        "--riders",
        "0",
        "--wrong-clock-share",
        "0.5",
    ]);
    let sent = leading_number(&stdout, "| fixes sent | ");
    let accepted = leading_number(&stdout, "| accepted | ");
    assert!(
        sent > 20 && accepted >= sent * 75 / 100,
        "accepted {accepted} of {sent}:\n{stdout}"
    );
}

/// The number that follows `label` in the report.
fn leading_number(report: &str, label: &str) -> u64 {
    let at = report
        .find(label)
        .unwrap_or_else(|| panic!("{label} in {report}"))
        + label.len();
    let digits: String = report[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

#[test]
fn the_demo_over_https_serves_dashboards_over_wss() {
    let stdout = demo(&[
        "--drivers",
        "20",
        "--riders",
        "2",
        "--https",
        "--dashboards",
        "2",
    ]);
    for line in [
        "HTTP    https://127.0.0.1:",
        "| dashboards, city (counts) | 1 connected;",
        "| dashboards, district (vehicles) | 1 connected;",
    ] {
        assert!(stdout.contains(line), "{line} missing from:\n{stdout}");
    }
    assert!(!stdout.contains("dashboard errors"), "{stdout}");
}

#[test]
fn a_scenario_file_that_does_not_parse_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[drivers]\ncount = \"many\"\n").unwrap();
    let out = sim().arg("run").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("count"),
        "{stderr}"
    );
}

#[test]
fn the_airport_scenario_checks_every_zone_event_against_what_the_drivers_did() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("airport.json");
    let out = sim()
        .args([
            "airport",
            "--embedded",
            "--drivers",
            "10",
            "--max-wait",
            "3s",
        ])
        .args(["--scale", "0.4", "--json"])
        .arg(&json)
        .env("HEXFLEET_DEV_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["drivers"], 10);
    // Every driver enters at least once; those that left or signed off exit.
    assert!(summary["entered"].as_u64().unwrap() >= 10, "{summary}");
    assert_eq!(summary["entered"], summary["expected_entered"]);
    assert_eq!(summary["exited"], summary["expected_exited"]);
    assert!(
        !summary["queue_listed"].as_array().unwrap().is_empty(),
        "{summary}"
    );
}
