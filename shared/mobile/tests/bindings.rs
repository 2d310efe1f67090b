//! The bindings as an app gets them: Kotlin, Swift and Python generated
//! from the built library, and the Python ones driving a real node.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use hexfleet_tests::{TestNode, SECRET};

fn library_name() -> String {
    format!(
        "{}hexfleet_mobile{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The library cargo built for these tests: `cargo test` leaves it in
/// `deps/` beside the generator's directory.
fn library() -> PathBuf {
    let bindgen = PathBuf::from(env!("CARGO_BIN_EXE_uniffi-bindgen"));
    let dir = bindgen.parent().expect("the generator's directory");
    let library = dir.join("deps").join(library_name());
    assert!(library.exists(), "{} was not built", library.display());
    library
}

fn generate(language: &str) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("bindings")
        .join(language);
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
        .args(["generate", "--library"])
        .arg(library())
        .args(["--language", language, "--out-dir"])
        .arg(&out)
        .status()
        .expect("the generator runs");
    assert!(status.success(), "generating {language}: {status}");
    if language == "python" {
        // The module loads the library from beside itself.
        std::fs::copy(library(), out.join(library_name())).expect("the library copied");
    }
    out
}

fn read_all(dir: &Path, extension: &str) -> String {
    let mut text = String::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("a generated directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == extension) {
                text += &std::fs::read_to_string(&path).expect("a generated source");
            }
        }
    }
    text
}

/// The Python module, generated once for the tests that run it.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| generate("python"))
}

#[test]
fn kotlin_and_swift_sources_are_generated_with_the_whole_surface() {
    let kotlin = read_all(&generate("kotlin"), "kt");
    let swift = read_all(&generate("swift"), "swift");
    for (language, source) in [("Kotlin", &kotlin), ("Swift", &swift)] {
        for name in [
            "Driver",
            "Rider",
            "TokenProvider",
            "RiderListener",
            "DriverListener",
            "ConnectionState",
            "MobileError",
            "reportLocation",
            "onRemoved",
            "PauseMode",
        ] {
            assert!(source.contains(name), "{language} lacks {name}");
        }
    }
}

/// Runs a Python script (relative to this crate) with the bindings and
/// the examples' helpers importable, against `node`; prints and returns
/// its output.
async fn run_python(script: &str, node: &TestNode) -> std::process::Output {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let examples = here.join("examples/python");
    let output = tokio::process::Command::new("python3")
        .arg(here.join(script))
        .env(
            "PYTHONPATH",
            format!("{}:{}", python().display(), examples.display()),
        )
        .env("HEXFLEET_QUIC", node.node.quic_addr.to_string())
        .env("HEXFLEET_CERT", node.cert())
        .env("HEXFLEET_TOKEN_SECRET", SECRET)
        .output()
        .await
        .expect("python3 runs");
    println!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_bindings_drive_a_real_node() {
    let node = TestNode::start_with(None, |c| c.http.tls = true).await;
    let output = run_python("tests/python/test_bindings.py", &node).await;
    assert!(output.status.success(), "the Python tests failed");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_runs_against_a_node() {
    let node = TestNode::start(None).await;
    let output = run_python("examples/python/demo.py", &node).await;
    assert!(output.status.success(), "the example failed");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(out.contains("rider: removed   py-demo-driver"), "{out}");
    node.stop().await;
}
