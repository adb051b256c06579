//! Generates the gRPC code from `proto/` with a vendored `protoc`, so a fresh
//! machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "../proto/tessera/v1/broker.proto",
        "../proto/tessera/v1/admin.proto",
        "../proto/tessera/v1/retention.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tessera_descriptor.bin"))
        // Messages that carry a secret value or a token get a hand-written,
        // redacting `Debug` (see `broker/src/proto.rs`).
        .skip_debug([
            "tessera.v1.Lease",
            "tessera.v1.PutSecretRequest",
            "tessera.v1.CreateAgentResponse",
            "tessera.v1.EncryptRequest",
            "tessera.v1.DecryptResponse",
            "tessera.v1.GenerateDataKeyResponse",
            "tessera.v1.RecoverClassRequest",
            "tessera.v1.UnsealRequest",
            "tessera.v1.RotateNowRequest",
            "tessera.v1.RekeyRootRequest",
            "tessera.v1.RekeyRootResponse",
        ])
        .compile_with_config(config, &protos, &["../proto"])?;
    Ok(())
}
