//! Rows of a stored tensor read back one range at a time, from every tier: equal to the rows of
//! the tensor put, prefetched or not, until the tensor is released.
use offload::store::{ActivationStore, NvmeConfig, StoreConfig, Tier};
use tch::{Device, Kind, Tensor};

fn stores() -> Vec<(&'static str, ActivationStore, Tier)> {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("store-rows");
    std::fs::create_dir_all(&dir).unwrap();
    let nvme = NvmeConfig { dir, bytes: 64 << 20, rank: 0, io_uring: true };
    let base = StoreConfig { max_inflight: 1 << 20, ..Default::default() };
    vec![
        ("resident", ActivationStore::resident(), Tier::Keep),
        ("host", ActivationStore::new(&StoreConfig { host_bytes: 64 << 20, ..base.clone() }).unwrap(), Tier::Host),
        ("numa", ActivationStore::new(&StoreConfig { numa: Some((offload::numa::current_node(), 64 << 20)), ..base.clone() }).unwrap(), Tier::Numa),
        ("nvme", ActivationStore::new(&StoreConfig { nvme: Some(nvme), ..base }).unwrap(), Tier::Nvme),
    ]
}

#[test]
fn rows_come_back_from_every_tier_until_released() {
    // 2.9 MB of float32 rows: NVMe ranges cross its 1 MiB checksum chunks.
    let big = Tensor::randn([1500, 3, 161], (Kind::Float, Device::Cpu));
    let small = Tensor::randn([40, 5], (Kind::Double, Device::Cpu));
    for (what, mut store, tier) in stores() {
        store.put(3, "x", big.copy(), tier).unwrap();
        store.put(3, "lse", small.copy(), tier).unwrap();
        store.flush().unwrap();
        // Tiles from the last to the first, the next one prefetched while this one is read.
        let mut ranges: Vec<(i64, i64)> = (0..1500).step_by(512).map(|a| (a, 512.min(1500 - a))).collect();
        ranges.reverse();
        store.prefetch_rows(3, "x", ranges[0].0, ranges[0].1).unwrap();
        for (i, &(a, n)) in ranges.iter().enumerate() {
            if let Some(&(b, m)) = ranges.get(i + 1) {
                store.prefetch_rows(3, "x", b, m).unwrap();
            }
            let rows = store.take_rows(3, "x", a, n).unwrap();
            assert!(rows.equal(&big.narrow(0, a, n)), "{what}: rows [{a}, {})", a + n);
        }
        // The same rows again, and a range never prefetched; then an out-of-range one.
        assert!(store.take_rows(3, "x", 1000, 1).unwrap().equal(&big.narrow(0, 1000, 1)), "{what}");
        assert!(store.take_rows(3, "lse", 7, 30).unwrap().equal(&small.narrow(0, 7, 30)), "{what}");
        let e = store.take_rows(3, "x", 1490, 11).unwrap_err().to_string();
        assert!(e.contains("rows [1490, 1501)"), "{what}: {e}");
        // A prefetch left behind is dropped with the tensor.
        store.prefetch_rows(3, "x", 0, 10).unwrap();
        store.release(3, "x").unwrap();
        assert!(store.take(3, "lse").unwrap().equal(&small), "{what}");
        assert!(store.is_empty(), "{what}: {} entries left", store.len());
        let e = store.take_rows(3, "x", 0, 1).unwrap_err().to_string();
        assert!(e.contains("layer 3 tensor `x` was never stored"), "{what}: {e}");
        assert!(store.release(3, "x").is_err(), "{what}");
        let s = store.stats();
        if tier != Tier::Keep {
            assert!(s.read_bytes > big.numel() as u64 * 4, "{what}: {} bytes read", s.read_bytes);
        }
    }
}
