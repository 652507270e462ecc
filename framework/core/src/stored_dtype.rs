//! The element types checkpoint files name, spelled as safetensors spells
//! them (`F32`, `BF16`, `U8`, ...): one table for their sizes and the MLX
//! dtype each loads as, shared by every reader and writer, and the `.npy`
//! header parser that maps NumPy's `descr` onto them.

use mlx_rs::Dtype;

/// An element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredDtype {
    /// 64-bit float.
    F64,
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 64-bit unsigned integer.
    U64,
    /// 32-bit unsigned integer.
    U32,
    /// 16-bit unsigned integer.
    U16,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean (one byte).
    Bool,
}

impl StoredDtype {
    /// The type a file names (`F32`, `BF16`, ...), if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "F64" => Self::F64,
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::Bf16,
            "I64" => Self::I64,
            "I32" => Self::I32,
            "I16" => Self::I16,
            "I8" => Self::I8,
            "U64" => Self::U64,
            "U32" => Self::U32,
            "U16" => Self::U16,
            "U8" => Self::U8,
            "BOOL" => Self::Bool,
            _ => return None,
        })
    }

    /// The name files use.
    pub fn name(self) -> &'static str {
        match self {
            Self::F64 => "F64",
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::I64 => "I64",
            Self::I32 => "I32",
            Self::I16 => "I16",
            Self::I8 => "I8",
            Self::U64 => "U64",
            Self::U32 => "U32",
            Self::U16 => "U16",
            Self::U8 => "U8",
            Self::Bool => "BOOL",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 | Self::U64 => 8,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F16 | Self::Bf16 | Self::I16 | Self::U16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// The MLX dtype it loads as.
    pub fn mlx(self) -> Dtype {
        match self {
            Self::F64 => Dtype::Float64,
            Self::F32 => Dtype::Float32,
            Self::F16 => Dtype::Float16,
            Self::Bf16 => Dtype::Bfloat16,
            Self::I64 => Dtype::Int64,
            Self::I32 => Dtype::Int32,
            Self::I16 => Dtype::Int16,
            Self::I8 => Dtype::Int8,
            Self::U64 => Dtype::Uint64,
            Self::U32 => Dtype::Uint32,
            Self::U16 => Dtype::Uint16,
            Self::U8 => Dtype::Uint8,
            Self::Bool => Dtype::Bool,
        }
    }
}

/// Bytes per element of a dtype as safetensors spells it.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    StoredDtype::parse(dtype).map(StoredDtype::size)
}

/// Parses a `.npy` header: its total length, the dtype (as safetensors
/// spells it) and the shape. Only little-endian, C-ordered arrays are read.
pub fn parse_npy_header(data: &[u8]) -> std::result::Result<(usize, String, Vec<usize>), String> {
    if data.len() < 10 || &data[..6] != b"\x93NUMPY" {
        return Err("not a .npy array".into());
    }
    let (header_len, start) = match data[6] {
        1 => (u16::from_le_bytes([data[8], data[9]]) as usize, 10),
        2 | 3 if data.len() >= 12 => (
            u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = std::str::from_utf8(
        data.get(start..start + header_len)
            .ok_or("truncated header")?,
    )
    .map_err(|_| "header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))?;
        let rest = header[at + key.len() + 2..]
            .trim_start()
            .strip_prefix(':')?
            .trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or("no descr")?;
    let dtype = match descr {
        "<f4" => StoredDtype::F32,
        "<f2" => StoredDtype::F16,
        "<f8" => StoredDtype::F64,
        "<i8" => StoredDtype::I64,
        "<i4" => StoredDtype::I32,
        "|u1" => StoredDtype::U8,
        "|b1" => StoredDtype::Bool,
        other => {
            return Err(format!(
                "dtype {other} is not supported (little-endian f2/f4/f8/i4/i8, u1, b1)"
            ))
        }
    };
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape_text = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or("no shape")?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape entry {s:?}"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((start + header_len, dtype.name().to_owned(), shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sizes_and_mlx_types_agree() {
        for name in [
            "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8",
            "BOOL",
        ] {
            let dtype = StoredDtype::parse(name).unwrap();
            assert_eq!(dtype.name(), name);
            let one = mlx_rs::ops::zeros_dtype(&[1], dtype.mlx()).unwrap();
            assert_eq!(dtype.size(), one.item_size(), "{name}");
        }
        assert_eq!(StoredDtype::parse("F8_E4M3"), None);
    }
}
