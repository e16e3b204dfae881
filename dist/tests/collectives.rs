//! Two processes on 127.0.0.1 (this test binary re-run as its ranks): the TCPStore, a Gloo group
//! and every collective the shim offers give the values torch.distributed defines; an unreachable
//! store is a timeout error, not a hang.
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dist::{ProcessGroup, ReduceOp, Store};
use tch::{Kind, Tensor};

const RANK_VAR: &str = "STRATA_DIST_TEST_RANK";
const PORT_VAR: &str = "STRATA_DIST_TEST_PORT";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One rank's part (runs only in the child processes).
fn rank_main(rank: usize, port: u16) {
    let world = 2;
    let store = Arc::new(Store::tcp("127.0.0.1", port, rank == 0, Duration::from_secs(30), "/test/").unwrap());
    store.set(&format!("hello{rank}"), format!("from {rank}").as_bytes()).unwrap();
    assert_eq!(store.get(&format!("hello{}", 1 - rank)).unwrap(), format!("from {}", 1 - rank).as_bytes());
    let pg = ProcessGroup::gloo(store.clone(), rank, world, Duration::from_secs(30)).unwrap();
    let r = rank as f64;
    // all_reduce: sum and max, in place, float64 and float32.
    let t = Tensor::from_slice(&[r + 1.0, 10.0 * r, -r]);
    pg.all_reduce(&t, ReduceOp::Sum).unwrap();
    assert_eq!(Vec::<f64>::try_from(&t).unwrap(), vec![3.0, 10.0, -1.0]);
    let t = Tensor::from_slice(&[r as f32, -(r as f32)]);
    pg.all_reduce(&t, ReduceOp::Max).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 0.0]);
    // Two collectives in flight at once, waited in order.
    let (a, b) = (Tensor::full([1000], r, (Kind::Double, tch::Device::Cpu)), Tensor::full([7], 2.0 * r, (Kind::Double, tch::Device::Cpu)));
    let (wa, wb) = (pg.all_reduce_async(&a, ReduceOp::Sum).unwrap(), pg.all_reduce_async(&b, ReduceOp::Sum).unwrap());
    wa.wait().unwrap();
    wb.wait().unwrap();
    assert!(a.equal(&Tensor::full([1000], 1.0, (Kind::Double, tch::Device::Cpu))) && b.equal(&Tensor::full([7], 2.0, (Kind::Double, tch::Device::Cpu))));
    // broadcast from rank 1.
    let t = Tensor::from_slice(&[r, r]);
    pg.broadcast(&t, 1).unwrap();
    assert_eq!(Vec::<f64>::try_from(&t).unwrap(), vec![1.0, 1.0]);
    // all_gather: rank order along dimension 0.
    let g = pg.all_gather(&Tensor::from_slice(&[r, r + 0.5]).view([1, 2])).unwrap();
    assert_eq!(Vec::<f64>::try_from(&g.view([-1])).unwrap(), vec![0.0, 0.5, 1.0, 1.5]);
    // reduce_scatter: rank r gets the sum of everyone's part r.
    let input = Tensor::from_slice(&[1.0 + r, 2.0 + r, 3.0 + r, 4.0 + r]);
    let part = pg.reduce_scatter(&input, ReduceOp::Sum).unwrap();
    let want = if rank == 0 { vec![3.0, 5.0] } else { vec![7.0, 9.0] };
    assert_eq!(Vec::<f64>::try_from(&part).unwrap(), want);
    // all_to_all: part j to rank j.
    let input = Tensor::from_slice(&[10.0 * r, 10.0 * r + 1.0]);
    let got = pg.all_to_all(&input).unwrap();
    let want = if rank == 0 { vec![0.0, 10.0] } else { vec![1.0, 11.0] };
    assert_eq!(Vec::<f64>::try_from(&got).unwrap(), want);
    pg.barrier().unwrap();
    assert!(pg.reduce_scatter(&Tensor::from_slice(&[1.0, 2.0, 3.0]), ReduceOp::Sum).is_err());
    println!("rank {rank}: every collective as torch.distributed defines it");
}

#[test]
fn two_ranks_agree_on_every_collective() {
    if let (Ok(rank), Ok(port)) = (std::env::var(RANK_VAR), std::env::var(PORT_VAR)) {
        rank_main(rank.parse().unwrap(), port.parse().unwrap());
        return;
    }
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|r| {
            Command::new(&exe)
                .args(["--exact", "two_ranks_agree_on_every_collective", "--nocapture", "--test-threads", "1"])
                .env(RANK_VAR, r.to_string())
                .env(PORT_VAR, port.to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "rank {r} failed");
    }
}

#[test]
fn an_unreachable_store_is_a_timeout_error() {
    if std::env::var(RANK_VAR).is_ok() {
        return;
    }
    let t0 = Instant::now();
    let err = Store::tcp("127.0.0.1", free_port(), false, Duration::from_secs(2), "").err().expect("no store listens there").to_string();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(err.contains("TCPStore"), "{err}");
    println!("{err} (after {took:?})");
}
