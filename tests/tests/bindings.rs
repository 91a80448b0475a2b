//! The bindings (UniFFI, `bindings/`), generated from the built library and run against a real
//! server on both databases:
//! - Python: `bindings/python/test_session.py` drives two devices through a task (a cancelled round
//!   resumed, every round committed with both updates counted once).
//! - Kotlin: `bindings/kotlin/TestSession.kt` is compiled with the generated code and run on the JVM
//!   (JNA): one device, a cancelled round resumed, both rounds committed with its update once.
//!   `FEDHIVE_KOTLINC` names the compiler (else `kotlinc` on the `PATH`; `.ci/run` installs Kotlin
//!   2.3.21 from npm's `kotlin-compiler`), `FEDHIVE_JNA_JAR` the JNA jar (else Debian's
//!   `libjna-java`, with `libjna-jni`).
//! - Swift: generated and checked to declare the session API; no Swift compiler is reachable here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use fedhive_e2e::{ADMIN_TOKEN, Backend, ServerProcess, TestDb, on_both_databases};
use fedhive_ffi::{TargetLanguage, generate_bindings};

on_both_databases!(
    the_python_binding_completes_rounds_of_a_real_task,
    the_kotlin_binding_compiles_and_completes_rounds_of_a_real_task
);

/// The bindings' cdylib, which cargo builds beside this test's executable (`target/<profile>/deps/`)
/// as a dependency of this crate.
fn ffi_library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let name = format!(
        "{}fedhive_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let lib = exe.with_file_name(name);
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
    let swift = dir.path().join("swift");
    generate_bindings(&lib, TargetLanguage::Swift, &swift).unwrap();
    let code = std::fs::read_to_string(swift.join("fedhive_ffi.swift")).unwrap();
    assert!(
        code.contains("class DeviceSession") && code.contains("runRound"),
        "fedhive_ffi.swift lacks the session API"
    );

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

/// Debian's `libjna-java` jar unless `FEDHIVE_JNA_JAR` names another.
fn jna_jar() -> PathBuf {
    let jar = std::env::var_os("FEDHIVE_JNA_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/java/jna.jar"));
    assert!(
        jar.exists(),
        "{} is missing: apt-get install libjna-java libjna-jni, or set FEDHIVE_JNA_JAR",
        jar.display()
    );
    jar
}

/// The generated Kotlin and `TestSession.kt`, compiled once for the process into a jar that holds
/// the Kotlin runtime. Compiling takes about 30 s, so the two databases' tests share it.
fn kotlin_test_jar() -> &'static Path {
    static JAR: OnceLock<PathBuf> = OnceLock::new();
    JAR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let generated = dir.join("generated");
        generate_bindings(&ffi_library(), TargetLanguage::Kotlin, &generated).unwrap();
        let kotlinc = std::env::var("FEDHIVE_KOTLINC").unwrap_or_else(|_| "kotlinc".into());
        let test = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bindings/kotlin/TestSession.kt");
        let jar = dir.join("test-session.jar");
        let output = Command::new(&kotlinc)
            .args([
                "-nowarn",
                "-Werror",
                "-include-runtime",
                "-jvm-target",
                "17",
                "-cp",
            ])
            .arg(jna_jar())
            .arg("-d")
            .arg(&jar)
            .arg(generated.join("uniffi/fedhive_ffi/fedhive_ffi.kt"))
            .arg(test)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "could not run `{kotlinc}` ({e}): install Kotlin 2.3 (`npm pack kotlin-compiler@2.3.21`) \
                     or set FEDHIVE_KOTLINC to its kotlinc"
                )
            });
        assert!(
            output.status.success(),
            "kotlinc failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        jar
    })
}

async fn the_kotlin_binding_compiles_and_completes_rounds_of_a_real_task(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let jar = tokio::task::spawn_blocking(kotlin_test_jar).await.unwrap();

    let lib = ffi_library();
    let classpath = std::env::join_paths([jar.to_path_buf(), jna_jar()]).unwrap();
    let output = Command::new("java")
        .arg(format!("-Djna.library.path={}", lib.parent().unwrap().display()))
        // Debian's JNA loads its native part from the system (libjna-jni).
        .args([
            "-Djna.nosys=false",
            "-Djava.library.path=/usr/lib/x86_64-linux-gnu/jni",
        ])
        .arg("-cp")
        .arg(classpath)
        .arg("TestSessionKt")
        .arg(&server.base_url)
        .arg(ADMIN_TOKEN)
        .arg(dir.path().join("state"))
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
        "TestSession.kt failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("kotlin binding: a device completed 2 rounds of a real task"),
        "{stdout}"
    );
}
