//! What a host's metrics cost: the counting of one W1 orchestration (3 calls: 4 transitions, 4
//! persistence points, 3 send attempts, and a share of a group commit and of a claim), on one
//! registry. `cargo bench -p cairn --bench metrics`; the figure is in docs/performance.md.

use std::time::Duration;

use cairn::host::{Metrics, TransitionOutcome};
use criterion::{criterion_group, criterion_main, Criterion};

fn counting_per_w1_orchestration(c: &mut Criterion) {
    let m = Metrics::new();
    let mut i = 0u64;
    c.bench_function("counting one W1 orchestration", |b| {
        b.iter(|| {
            for _ in 0..4 {
                m.transition(
                    "bench.chain",
                    TransitionOutcome::Ok,
                    Duration::from_micros(2),
                );
            }
            for reason in ["send", "send", "send", "complete"] {
                m.point(reason);
            }
            for _ in 0..3 {
                m.send_attempt("echo", "delivered");
            }
            i += 1;
            if i % 64 == 0 {
                m.commit(256, Duration::from_millis(3));
                m.claim(Duration::from_micros(300));
                m.in_memory(1000);
            }
        });
    });
}

criterion_group!(benches, counting_per_w1_orchestration);
criterion_main!(benches);
