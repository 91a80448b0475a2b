//! The Python binding (UniFFI, `bindings/`): its code is generated from the built library, and
//! `bindings/python/test_session.py` drives two devices through a real task with it (a cancelled
//! round resumed, every round committed with both updates counted once). Kotlin and Swift code is
//! generated from the same library; no Kotlin or Swift compiler is on the CI machine to build it.

use std::path::{Path, PathBuf};
use std::process::Command;

use fedhive_e2e::{ADMIN_TOKEN, Backend, ServerProcess, TestDb, on_both_databases};
use fedhive_ffi::{TargetLanguage, generate_bindings};

on_both_databases!(the_python_binding_completes_rounds_of_a_real_task);

/// The bindings' cdylib, built beside this test's executable (`target/<profile>/`).
fn ffi_library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let name = format!(
        "{}fedhive_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let lib = profile_dir.join(name);
    assert!(
        lib.exists(),
        "{} is missing (cargo builds it with fedhive-ffi)",
        lib.display()
    );
    lib
}

async fn the_python_binding_completes_rounds_of_a_real_task(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();

    let lib = ffi_library();
    let python = dir.path().join("python");
    generate_bindings(&lib, TargetLanguage::Python, &python).unwrap();
    std::fs::copy(&lib, python.join(lib.file_name().unwrap())).unwrap();
    for (language, file, declares) in [
        (
            TargetLanguage::Kotlin,
            "uniffi/fedhive_ffi/fedhive_ffi.kt",
            "class DeviceSession",
        ),
        (TargetLanguage::Swift, "fedhive_ffi.swift", "class DeviceSession"),
    ] {
        let out = dir.path().join(format!("{language:?}"));
        generate_bindings(&lib, language, &out).unwrap();
        let code = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(
            code.contains(declares) && code.contains("runRound"),
            "{file} lacks the session API"
        );
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bindings/python/test_session.py");
    let output = Command::new("python3")
        .arg(script)
        .args([
            "--server",
            &server.base_url,
            "--admin-token",
            ADMIN_TOKEN,
            "--state",
        ])
        .arg(dir.path().join("state"))
        .env("PYTHONPATH", &python)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "test_session.py failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("python binding: 2 devices completed 2 rounds of a real task"),
        "{stdout}"
    );
}
