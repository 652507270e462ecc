//! Link-time stand-ins for the CUDA libraries a CUDA build of `libmlx`
//! depends on (`libcuda.so.1`, `libcudnn.so.9`, `libcublasLt.so.13`, ...).
//!
//! GNU ld refuses to link an executable against a shared library whose own
//! dependencies leave symbols undefined, and a machine without the NVIDIA
//! driver and CUDA runtime (CI, a laptop preparing a binary for a GPU server)
//! has none of them. For each such dependency this module compiles a small
//! shared library with the same SONAME that defines the symbols `libmlx`
//! takes from it (under the same symbol versions), used only while linking:
//! the staged link copy of `libmlx` finds them through its rpath, while the
//! copy that programs load at run time never sees them, so a program on a
//! machine without CUDA fails with the loader's own "libcuda.so.1: cannot
//! open shared object file" rather than inside a stub.

use crate::tools;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

/// Dependencies never stubbed: the C and C++ runtimes, and the BLAS and
/// LAPACK libraries that the staged copy binds to real ones.
const SYSTEM_PREFIXES: &[&str] = &[
    "libc.",
    "libm.",
    "libdl.",
    "librt.",
    "libpthread.",
    "libstdc++.",
    "libgcc_s.",
    "ld-linux",
    "libblas",
    "liblapack",
    "libcblas",
    "libopenblas",
    "libgfortran",
    "libquadmath",
];

/// Symbol-name prefixes of unversioned symbols, by the library that
/// defines them (the CUDA driver API and NCCL carry no symbol versions).
const UNVERSIONED_OWNERS: &[(&str, &str)] = &[
    ("cu", "libcuda.so"),
    ("nccl", "libnccl.so"),
    ("cudnn", "libcudnn.so"),
    ("cublas", "libcublas"),
    ("cufft", "libcufft.so"),
    ("nvrtc", "libnvrtc.so"),
];

/// Writes one stub per non-system dependency of `library` into `dir`;
/// returns their file names.
pub fn write_stubs(library: &Path, dir: &Path) -> Result<Vec<String>, String> {
    let needed = tools::run(
        Command::new("patchelf").arg("--print-needed").arg(library),
        "reading libmlx's dependencies",
    )?;
    let stubbed: Vec<String> = needed
        .lines()
        .map(str::trim)
        .filter(|lib| !lib.is_empty())
        .filter(|lib| !SYSTEM_PREFIXES.iter().any(|p| lib.starts_with(p)))
        .map(str::to_owned)
        .collect();
    if stubbed.is_empty() {
        return Ok(stubbed);
    }
    let undefined = tools::run(
        Command::new("nm")
            .args(["-D", "--undefined-only"])
            .arg(library),
        "listing libmlx's undefined symbols (nm, from binutils)",
    )?;
    let symbols = assign_symbols(&undefined, &stubbed);
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let compiler = tools::cxx_compiler().ok_or("no C/C++ compiler for the CUDA stubs")?;
    for lib in &stubbed {
        let empty = Vec::new();
        let (versioned, plain) = symbols.get(lib.as_str()).unwrap_or(&empty).iter().fold(
            (Vec::new(), Vec::new()),
            |(mut versioned, mut plain), (name, has_version)| {
                if *has_version {
                    versioned.push(name.as_str());
                } else {
                    plain.push(name.as_str());
                }
                (versioned, plain)
            },
        );
        let source: String = versioned
            .iter()
            .chain(&plain)
            .map(|name| format!("void {name}(void) {{}}\n"))
            .collect();
        let stem = dir.join(format!("{lib}.stub"));
        let c_file = stem.with_extension("c");
        fs::write(&c_file, format!("/* link-time stub of {lib} */\n{source}"))
            .map_err(|e| format!("{}: {e}", c_file.display()))?;
        let mut command = Command::new(&compiler);
        command
            .args(["-x", "c", "-shared", "-fPIC", "-o"])
            .arg(dir.join(lib))
            .arg(&c_file)
            .arg(format!("-Wl,-soname,{lib}"));
        if !versioned.is_empty() {
            let map = stem.with_extension("map");
            fs::write(
                &map,
                format!(
                    "{lib} {{\n  global:\n    {};\n}};\n",
                    versioned.join(";\n    ")
                ),
            )
            .map_err(|e| format!("{}: {e}", map.display()))?;
            command.arg(format!("-Wl,--version-script={}", map.display()));
        }
        tools::run(
            &mut command,
            &format!("compiling the link-time stub of {lib}"),
        )?;
        fs::remove_file(&c_file).map_err(|e| format!("{}: {e}", c_file.display()))?;
    }
    Ok(stubbed)
}

/// Sorts the undefined symbols of `nm -D --undefined-only` output among the
/// stubbed libraries: `name@VERSION` goes to the library called VERSION (the
/// CUDA toolkit names its symbol versions after the library), an
/// unversioned name to the library its prefix belongs to. Weak references and
/// symbols of other libraries are left out.
fn assign_symbols<'a>(
    nm_output: &str,
    stubbed: &'a [String],
) -> BTreeMap<&'a str, Vec<(String, bool)>> {
    let mut owned: BTreeMap<&str, Vec<(String, bool)>> = BTreeMap::new();
    for line in nm_output.lines() {
        let mut fields = line.split_whitespace();
        let (Some(kind), Some(symbol)) = (fields.next(), fields.next()) else {
            continue;
        };
        if kind != "U" {
            continue;
        }
        let (name, version) = match symbol.split_once('@') {
            Some((name, version)) => (name, Some(version.trim_start_matches('@'))),
            None => (symbol, None),
        };
        let owner = match version {
            Some(version) => stubbed.iter().find(|lib| lib.as_str() == version),
            None => UNVERSIONED_OWNERS
                .iter()
                .filter(|(prefix, _)| name.starts_with(prefix))
                .max_by_key(|(prefix, _)| prefix.len())
                .and_then(|(_, lib)| stubbed.iter().find(|s| s.starts_with(lib))),
        };
        if let Some(lib) = owner {
            owned
                .entry(lib.as_str())
                .or_default()
                .push((name.to_owned(), version.is_some()));
        }
    }
    owned
}
