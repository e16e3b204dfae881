//! NUMA topology from sysfs and page binding through mbind(2), without libnuma. A node that has
//! memory but no CPUs is far memory: a CXL expander or a CPU-less socket's DRAM.
use std::path::{Path, PathBuf};

use crate::error::{OffloadError, Result};

/// One NUMA node as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Node number, as in `/sys/devices/system/node/node<id>`.
    pub id: u32,
    /// CPUs of the node (empty: far / CXL memory).
    pub cpus: Vec<u32>,
    /// Memory of the node in bytes (`MemTotal` of its meminfo).
    pub mem_total_bytes: u64,
}

impl Node {
    /// Memory without CPUs of its own: reached only across the interconnect.
    pub fn is_far(&self) -> bool {
        self.cpus.is_empty()
    }
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpulist(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// The nodes under `root` (normally /sys/devices/system/node); empty where the kernel has no
/// NUMA support (then all memory is one local node).
pub fn nodes_in(root: &Path) -> Result<Vec<Node>> {
    let io = |p: &Path, op: &'static str| {
        let path = p.to_path_buf();
        move |source| OffloadError::Io { path, op, source }
    };
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(Vec::new()) };
    let mut nodes = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("node").and_then(|n| n.parse::<u32>().ok()) else { continue };
        let dir = e.path();
        let cpulist_path = dir.join("cpulist");
        let cpulist = std::fs::read_to_string(&cpulist_path).map_err(io(&cpulist_path, "read"))?;
        let cpus = parse_cpulist(&cpulist).ok_or_else(|| bad(&cpulist_path, &cpulist))?;
        let meminfo_path = dir.join("meminfo");
        let meminfo = std::fs::read_to_string(&meminfo_path).map_err(io(&meminfo_path, "read"))?;
        // "Node 0 MemTotal:       14248152 kB"
        let kb = meminfo
            .lines()
            .find(|l| l.contains("MemTotal:"))
            .and_then(|l| l.split_whitespace().rev().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| bad(&meminfo_path, "no MemTotal line"))?;
        nodes.push(Node { id, cpus, mem_total_bytes: kb * 1024 });
    }
    nodes.sort_by_key(|n| n.id);
    Ok(nodes)
}

fn bad(path: &Path, what: &str) -> OffloadError {
    OffloadError::Io { path: path.to_path_buf(), op: "parse", source: std::io::Error::new(std::io::ErrorKind::InvalidData, what.trim().to_string()) }
}

/// This machine's nodes.
pub fn nodes() -> Result<Vec<Node>> {
    nodes_in(Path::new("/sys/devices/system/node"))
}

/// The node of the CPU this thread runs on (0 where that cannot be told).
pub fn current_node() -> u32 {
    let (mut cpu, mut node) = (0u32, 0u32);
    // SAFETY: getcpu writes two u32s through valid pointers; the third argument is unused (NULL).
    let r = unsafe { libc::syscall(libc::SYS_getcpu, &mut cpu as *mut u32, &mut node as *mut u32, std::ptr::null_mut::<libc::c_void>()) };
    if r == 0 {
        node
    } else {
        0
    }
}

const MPOL_BIND: libc::c_int = 2;
const MPOL_F_NODE: libc::c_ulong = 1;
const MPOL_F_ADDR: libc::c_ulong = 2;
/// Bits in the node masks passed to the kernel (1024 nodes, as libnuma uses).
const MASK_BITS: usize = 1024;

/// Binds the pages of `[addr, addr + len)` to `node`: pages touched later are allocated there,
/// and an allocation that the node cannot satisfy fails instead of landing elsewhere.
///
/// # Safety
/// `addr` must be page-aligned and `[addr, addr + len)` a mapping this process owns.
pub unsafe fn bind(addr: *mut u8, len: usize, node: u32) -> Result<()> {
    if node as usize >= MASK_BITS {
        return Err(no_node(node));
    }
    let mut mask = [0u64; MASK_BITS / 64];
    mask[node as usize / 64] |= 1 << (node % 64);
    // SAFETY: the caller guarantees the range; mask holds MASK_BITS bits as maxnode says.
    let r = unsafe { libc::syscall(libc::SYS_mbind, addr as *mut libc::c_void, len as libc::c_ulong, MPOL_BIND, mask.as_ptr(), (MASK_BITS + 1) as libc::c_ulong, 0 as libc::c_uint) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Err(no_node(node));
        }
        return Err(OffloadError::Io { path: PathBuf::from(format!("numa node {node}")), op: "mbind", source: e });
    }
    Ok(())
}

fn no_node(node: u32) -> OffloadError {
    let have: Vec<String> = nodes().unwrap_or_default().iter().map(|n| n.id.to_string()).collect();
    OffloadError::Io {
        path: PathBuf::from(format!("numa node {node}")),
        op: "bind",
        source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("no such node with memory (this machine has nodes [{}])", have.join(", "))),
    }
}

/// The node holding the page at `addr` (which must have been touched), from get_mempolicy(2).
pub fn node_of(addr: *const u8) -> Option<u32> {
    let mut node: libc::c_int = -1;
    // SAFETY: get_mempolicy with MPOL_F_NODE|MPOL_F_ADDR only reads the policy of the page at
    // addr and writes one int through a valid pointer; a NULL mask with maxnode 0 is allowed.
    let r = unsafe {
        libc::syscall(libc::SYS_get_mempolicy, &mut node as *mut libc::c_int, std::ptr::null_mut::<u64>(), 0 as libc::c_ulong, addr as *const libc::c_void, MPOL_F_NODE | MPOL_F_ADDR)
    };
    (r == 0 && node >= 0).then_some(node as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpulist("\n"), Some(vec![]));
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("x"), None);
    }

    #[test]
    fn far_node_from_a_sysfs_tree() {
        let root = std::env::temp_dir().join(format!("strata-numa-{}", std::process::id()));
        for (id, cpus, kb) in [(0, "0-7\n", 1000), (1, "\n", 2000)] {
            let d = root.join(format!("node{id}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cpulist"), cpus).unwrap();
            std::fs::write(d.join("meminfo"), format!("Node {id} MemTotal:       {kb} kB\nNode {id} MemFree: 1 kB\n")).unwrap();
        }
        std::fs::create_dir_all(root.join("power")).unwrap();
        let n = nodes_in(&root).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(n.len(), 2);
        assert!(!n[0].is_far() && n[0].cpus.len() == 8 && n[0].mem_total_bytes == 1000 * 1024);
        assert!(n[1].is_far() && n[1].mem_total_bytes == 2000 * 1024);
    }
}
