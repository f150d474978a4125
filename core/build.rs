fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/flotilla/v1/flotilla.proto");
    // The encoded descriptors of flotilla.v1, for the coordinator's reflection
    // service: grpcurl and friends list and call it without the .proto file.
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("flotilla_v1_descriptor.bin");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(descriptors)
        .compile_protos(&["proto/flotilla/v1/flotilla.proto"], &["proto"])?;
    Ok(())
}
