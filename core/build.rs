fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/flotilla/v1/flotilla.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/flotilla/v1/flotilla.proto"], &["proto"])?;
    Ok(())
}
