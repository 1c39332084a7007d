//! `capstan`, the binary: see the library's docs (`nodes/src/lib.rs`) for
//! the layout of the crate.

/// mimalloc rather than glibc's malloc: a node allocates and frees many
/// small buffers per operation (capnp messages, store requests, futures),
/// and under load glibc's malloc and free took about a fifth of a node's
/// CPU in a profile of the cluster bench.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    capstan::app::main()
}
