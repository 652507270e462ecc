//! The host tools the native build needs, checked up front so that a fresh
//! machine gets one message listing everything to install.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// A host tool and how to get it.
pub struct Tool {
    /// What the tool is, for the message.
    pub name: &'static str,
    /// How to install it on Debian/Ubuntu.
    pub install: &'static str,
    /// Whether it is present.
    pub present: fn() -> bool,
}

/// The tools needed on `target_os`.
pub fn needed(target_os: &str) -> Vec<Tool> {
    let mut tools = vec![
        Tool {
            name: "cmake",
            install: "cmake",
            present: || runs("cmake", &["--version"]),
        },
        Tool {
            name: "a C++20 compiler (c++, g++ or clang++)",
            install: "g++",
            present: || cxx_compiler().is_some(),
        },
        Tool {
            name: "libclang (for bindgen)",
            install: "libclang-dev",
            present: libclang_present,
        },
    ];
    if target_os == "linux" {
        tools.push(Tool {
            name: "patchelf",
            install: "patchelf",
            present: || runs("patchelf", &["--version"]),
        });
    }
    tools
}

/// Fails with one message naming every missing tool.
pub fn require(tools: &[Tool]) -> Result<(), String> {
    let missing: Vec<&Tool> = tools.iter().filter(|t| !(t.present)()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|t| t.name).collect();
    let packages: Vec<&str> = missing.iter().map(|t| t.install).collect();
    Err(format!(
        "missing build tools: {}.\nOn Debian/Ubuntu: apt-get install {}",
        names.join(", "),
        packages.join(" ")
    ))
}

/// The C++ compiler to use: `$CXX`, else the first of c++, g++, clang++.
pub fn cxx_compiler() -> Option<String> {
    if let Ok(cxx) = env::var("CXX") {
        return Some(cxx);
    }
    ["c++", "g++", "clang++"]
        .into_iter()
        .find(|cxx| runs(cxx, &["--version"]))
        .map(str::to_owned)
}

/// The C++ compiler and its `--version` text (which keys cached builds).
pub fn cxx_compiler_and_version() -> Result<(String, String), String> {
    let cxx = cxx_compiler().ok_or("no C++ compiler")?;
    let version = run(
        Command::new(&cxx).arg("--version"),
        "querying the C++ compiler",
    )?;
    Ok((cxx, version))
}

/// The Python interpreter used to run pip: `$PYTHON`, else python3.
pub fn python() -> String {
    env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Whether `program args` starts and exits successfully.
pub fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs a command, turning a spawn failure or a non-zero exit into a message
/// that includes the command's own output.
pub fn run(command: &mut Command, what: &str) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|e| format!("{what}: cannot start {:?}: {e}", command.get_program()))?;
    if !output.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{:?}\n{}{}",
            output.status,
            command,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn libclang_present() -> bool {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = env::var_os("LIBCLANG_PATH") {
        dirs.push(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("llvm-config").arg("--libdir").output() {
        dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    for base in ["/usr/lib", "/usr/lib64", "/usr/local/lib"] {
        dirs.push(PathBuf::from(base));
        dirs.push(PathBuf::from(base).join("x86_64-linux-gnu"));
        dirs.push(PathBuf::from(base).join("aarch64-linux-gnu"));
        if let Ok(entries) = std::fs::read_dir(base) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with("llvm") {
                    dirs.push(entry.path().join("lib"));
                }
            }
        }
    }
    dirs.push(PathBuf::from("/Library/Developer/CommandLineTools/usr/lib"));
    dirs.iter().any(|dir| {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries.flatten().any(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with("libclang.so")
                        || name == "libclang.dylib"
                        || (name.starts_with("libclang-") && name.contains(".so"))
                })
            })
            .unwrap_or(false)
    })
}
