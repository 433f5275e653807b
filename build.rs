//! Generates the C header from `src/ffi` with cbindgen, into `OUT_DIR` only; the
//! committed copy is `include/workpool.h`, and a test fails when the two differ.
//! cbindgen reads the crate from `src/lib.rs` and follows its modules to every file of
//! `src/ffi`; a change to any of them (or a new file there) reruns this.

fn main() {
    let crate_dir = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
    let out_dir = std::env::var("OUT_DIR").expect("set by cargo");
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config =
        cbindgen::Config::from_file(format!("{crate_dir}/cbindgen.toml")).expect("cbindgen.toml");
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header")
        .write_to_file(format!("{out_dir}/workpool.h"));
}
