//! The NVMe tier on this machine's disk: round trips through both engines, checksum detection,
//! a full tier, an impossible reservation.
use offload::nvme::{Engine, NvmeTier};
use offload::OffloadError;

fn dir() -> std::path::PathBuf {
    let d = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nvme");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[i % 4] ^ seed).collect()
}

#[test]
fn round_trip_through_both_engines_and_the_file_is_unlinked() {
    for uring in [true, false] {
        let mut t = NvmeTier::create(&dir(), 64 << 20, 0, uring).unwrap();
        println!("engine {:?}, O_DIRECT {}", t.engine(), t.direct);
        if !uring {
            assert_eq!(t.engine(), Engine::Blocking);
        }
        let files: Vec<_> = std::fs::read_dir(dir()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains(&format!("strata-offload-{}", std::process::id()))).collect();
        assert!(files.is_empty(), "the tier file must be unlinked right after opening");
        let sizes = [1usize, 4095, 4096, 4097, 3 << 20, (5 << 20) + 123];
        let mut ids = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            ids.push(t.write(&format!("layer{i}.x"), &pattern(n, i as u8)).unwrap());
        }
        // Free one in the middle and reuse its space.
        t.free(ids[2]).unwrap();
        let again = t.write("again", &pattern(4096, 99)).unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            if i != 2 {
                assert_eq!(t.read(ids[i]).unwrap(), pattern(n, i as u8), "slice {i} ({n} bytes)");
            }
        }
        assert_eq!(t.read(again).unwrap(), pattern(4096, 99));
        for (i, id) in ids.iter().enumerate() {
            if i != 2 {
                t.free(*id).unwrap();
            }
        }
        t.free(again).unwrap();
        assert_eq!(t.used(), 0, "every extent returns to the free list, coalesced");
        assert!(matches!(t.read(again), Err(OffloadError::UnknownSlice(_))));
    }
}

#[test]
fn a_flipped_byte_is_detected() {
    let mut t = NvmeTier::create(&dir(), 8 << 20, 1, true).unwrap();
    let id = t.write("layer7.attn_out", &pattern(100_000, 3)).unwrap();
    t.corrupt_byte_for_test(id, 54_321).unwrap();
    let err = t.read(id).unwrap_err().to_string();
    assert!(err.contains("layer7.attn_out") && err.contains("corrupt") && err.contains("crc32c"), "{err}");
}

#[test]
fn a_range_is_read_and_verified_by_the_chunks_that_cover_it() {
    for uring in [true, false] {
        let mut t = NvmeTier::create(&dir(), 16 << 20, 2, uring).unwrap();
        let data = pattern((3 << 20) + 777, 5);
        let id = t.write("layer2.x", &data).unwrap();
        let mut buf = offload::aligned::AlignedBuf::new(1);
        for (start, len) in [(0usize, 1usize), (4095, 2), ((1 << 20) - 3, 10), ((2 << 20) + 5, (1 << 20) + 700), (0, data.len()), (data.len() - 1, 1), (17, 0)] {
            let (at, _) = t.read_range_into(id, start, len, &mut buf).unwrap();
            assert_eq!(&buf.as_slice()[at..at + len], &data[start..start + len], "bytes [{start}, {})", start + len);
        }
        let e = t.read_range_into(id, data.len() - 1, 2, &mut buf).unwrap_err().to_string();
        assert!(e.contains("layer2.x") && e.contains(&format!("of the {}-byte slice", data.len())), "{e}");
        // A flipped byte in the third chunk: ranges in the first two still read, any range that
        // touches the third fails naming the slice and the chunk's offset.
        t.corrupt_byte_for_test(id, (2 << 20) + 10).unwrap();
        t.read_range_into(id, 100, (2 << 20) - 200, &mut buf).unwrap();
        let e = t.read_range_into(id, (3 << 20) - 1, 1, &mut buf).unwrap_err().to_string();
        assert!(e.contains("layer2.x") && e.contains("corrupt") && e.contains("1048576 bytes"), "{e}");
        assert!(t.read(id).is_err());
    }
}

#[test]
fn a_full_tier_and_an_impossible_reservation_are_clear_errors() {
    let mut t = NvmeTier::create(&dir(), 1 << 20, 2, true).unwrap();
    t.write("a", &pattern(700_000, 1)).unwrap();
    let err = t.write("layer3.gate", &pattern(700_000, 2)).unwrap_err().to_string();
    assert!(err.contains("nvme tier full") && err.contains("layer3.gate"), "{err}");
    // More than any disk here holds: fallocate fails with ENOSPC / EFBIG.
    let err = NvmeTier::create(&dir(), 1 << 60, 3, true).err().expect("must fail").to_string();
    assert!(err.contains("cannot reserve") && err.contains("strata-offload"), "{err}");
    let leftovers = std::fs::read_dir(dir()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains("rank3")).count();
    assert_eq!(leftovers, 0, "a failed reservation leaves no file behind");
}
