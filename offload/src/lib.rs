//! Memory tiers and the asynchronous activation pipeline (issue 4). Not built yet: nothing in
//! the trainer depends on this crate so far.
