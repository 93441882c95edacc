//! `cairn bench` never rots: every workload runs once, small and untimed, on both backends, and
//! the command prints the JSON fields the benchmark table is built from. The timed runs are
//! `just bench` (see docs/performance.md).

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::process::Command;

use cairn::bench::{BenchError, Settings, Workload};
use cairn::store::NewInstance;
use support::{Backend, TestDb};

backend_tests!(
    every_workload_runs_small,
    the_steady_state_workload_runs_small_and_reports_size_and_memory,
    the_benchmark_refuses_a_database_with_real_instances
);

/// A size for each workload that runs in a moment.
fn small(workload: Workload) -> usize {
    match workload {
        Workload::W3 => 2,
        Workload::W2 => 3,
        Workload::Ceiling => 300,
        _ => 20,
    }
}

async fn every_workload_runs_small(db: TestDb) {
    db.store.close().await;
    for workload in Workload::ALL {
        if workload == Workload::W6 && db.backend != Backend::Postgres {
            continue;
        }
        // Every figure, the one-call-at-a-time and separate-client ones too.
        let settings = Settings {
            callers: 4,
            from_process: true,
            ..Settings::default()
        };
        let figures = workload
            .run_with(&db.url, Some(small(workload)), &settings)
            .await
            .unwrap_or_else(|e| panic!("{workload:?}: {e}"));
        assert!(!figures.is_empty(), "{workload:?} measured nothing");
        for f in figures {
            assert!(f.wall_s > 0.0, "{workload:?}: {f:?}");
            let rate = f
                .orchestrations_per_s
                .or(f.persistence_points_per_s)
                .unwrap();
            assert!(rate > 0.0, "{workload:?}: {f:?}");
        }
    }
}

async fn the_benchmark_refuses_a_database_with_real_instances(db: TestDb) {
    let real = NewInstance {
        id: uuid::Uuid::new_v4(),
        orchestration: "order-fulfilment".to_owned(),
        version: 1,
        parent: None,
        input: serde_json::json!({}),
    };
    db.store
        .start_instances(vec![real], None, chrono::Utc::now())
        .await
        .unwrap();
    db.store.close().await;
    let err = Workload::W2.run(&db.url, Some(1)).await.unwrap_err();
    assert!(matches!(err, BenchError::NotABenchDatabase(_)), "{err}");
}

#[test]
fn the_bench_command_prints_one_json_object_per_figure() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "--database",
            &url,
            "bench",
            "--workload",
            "W2",
            "--workload",
            "ceiling",
        ])
        .args(["--instances", "3", "--runs", "2", "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = figures
        .iter()
        .map(|f| f["workload"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "W2",
            "ceiling-single",
            "ceiling-batch100",
            "ceiling-batch100-multirow"
        ],
        "{stdout}"
    );
    for f in &figures {
        for key in [
            "workload",
            "backend",
            "instances",
            "wall_s",
            "orchestrations_per_s",
            "persistence_points_per_s",
            "p50_ms",
            "p99_ms",
        ] {
            assert!(f.get(key).is_some(), "{key} missing in {f}");
        }
        assert_eq!(f["runs"], 2, "{f}");
        assert_eq!(f["backend"], "sqlite");
    }
    assert_eq!(figures[0]["workload"], "W2");
    assert!(figures[0]["p99_ms"].as_f64().unwrap() > 0.0);
}

async fn the_steady_state_workload_runs_small_and_reports_size_and_memory(db: TestDb) {
    db.store.close().await;
    let settings = cairn::bench::Settings {
        metrics: true,
        duration: std::time::Duration::from_secs(3),
        rate: 40.0,
        retain: std::time::Duration::from_secs(1),
        ..Settings::default()
    };
    let figures = Workload::W7
        .run_with(&db.url, None, &settings)
        .await
        .unwrap_or_else(|e| panic!("W7: {e}"));
    let f = &figures[0];
    assert_eq!(f.workload, "W7");
    assert!(f.instances >= 80, "{f:?}");
    for key in [
        "db_bytes_start",
        "db_bytes_end",
        "rss_mb_start",
        "rss_mb_end",
        "p99_ms_minute_01",
    ] {
        assert!(f.extra.get(key).is_some_and(|v| *v > 0.0), "{key} in {f:?}");
    }
}
