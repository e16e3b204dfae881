//! Memory model, swap/recompute LP and buffer-layout MIP (issue 5). Not built yet: nothing in
//! the trainer depends on this crate so far.
