//! A restricted reader of the pickles inside PyTorch checkpoints
//! (`pytorch_model.bin`): it understands the opcodes a state dict of tensors
//! uses and builds values instead of running code. The only callables it
//! accepts are `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`
//! and `_rebuild_parameter`, and torch storage types; any other global is
//! refused by name, so a malicious checkpoint cannot execute anything.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::rc::Rc;

/// The deepest nesting of tuples, lists and dicts a state dict may use (a
/// real one nests about five deep). Deeper values are refused as they are
/// built: a million nested tuples overflowed the stack when dropped.
const MAX_DEPTH: usize = 256;

/// A tensor described by a pickle: which storage, where, and its layout.
#[derive(Debug, Clone, PartialEq)]
pub struct PickledTensor {
    /// The storage key (its file name under `data/` in the archive).
    pub storage: String,
    /// The element type, as safetensors spells it (`F32`, `F16`, `BF16`, ...).
    pub dtype: String,
    /// Offset into the storage, in elements.
    pub offset: usize,
    /// The shape.
    pub shape: Vec<usize>,
    /// The strides, in elements.
    pub stride: Vec<usize>,
}

/// A pickled value. Containers are shared (`Rc`): the memo and the stack
/// hold references, not copies, so a pickle that appends a list to itself
/// over and over grows linearly rather than exponentially. Each container
/// knows its nesting depth.
#[derive(Debug, Clone)]
enum Value {
    None,
    Other,
    Int(i64),
    Str(Rc<str>),
    Tuple(Seq<Value>),
    List(Seq<Value>),
    Dict(Seq<(Value, Value)>),
    Global(String, String),
    Storage { key: String, dtype: String },
    Tensor(PickledTensor),
    Mark,
}

/// Shared container items with their nesting depth.
#[derive(Debug, Clone)]
struct Seq<T> {
    items: Rc<Vec<T>>,
    depth: usize,
}

impl Value {
    /// How deeply containers nest inside this value (0 for a scalar).
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(d) => d.depth,
            _ => 0,
        }
    }
}

impl<T> Seq<T> {
    fn empty() -> Self {
        Self {
            items: Rc::new(Vec::new()),
            depth: 1,
        }
    }
}

impl Seq<Value> {
    /// A container of `items`, refused past [`MAX_DEPTH`].
    fn of(items: Vec<Value>, r: &Reader) -> Result<Self> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        check_depth(depth, r)?;
        Ok(Self {
            items: Rc::new(items),
            depth,
        })
    }

    /// Appends `values` in place (copying the item list only when the
    /// memo or another container shares it).
    fn extend(&mut self, values: Vec<Value>, r: &Reader) -> Result<()> {
        let depth = values.iter().map(|v| 1 + v.depth()).max().unwrap_or(0);
        self.depth = self.depth.max(depth);
        check_depth(self.depth, r)?;
        Rc::make_mut(&mut self.items).extend(values);
        Ok(())
    }
}

impl Seq<(Value, Value)> {
    /// Adds key/value pairs in place.
    fn extend(&mut self, pairs: Vec<(Value, Value)>, r: &Reader) -> Result<()> {
        let depth = pairs
            .iter()
            .map(|(k, v)| 1 + k.depth().max(v.depth()))
            .max()
            .unwrap_or(0);
        self.depth = self.depth.max(depth);
        check_depth(self.depth, r)?;
        Rc::make_mut(&mut self.items).extend(pairs);
        Ok(())
    }
}

fn check_depth(depth: usize, r: &Reader) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(r.err(format!(
            "values nest more than {MAX_DEPTH} deep; a state dict nests a few levels"
        )));
    }
    Ok(())
}

fn storage_dtype(name: &str) -> Option<&'static str> {
    Some(match name {
        "FloatStorage" => "F32",
        "HalfStorage" => "F16",
        "BFloat16Storage" => "BF16",
        "DoubleStorage" => "F64",
        "LongStorage" => "I64",
        "IntStorage" => "I32",
        "ShortStorage" => "I16",
        "CharStorage" => "I8",
        "ByteStorage" => "U8",
        "BoolStorage" => "BOOL",
        _ => return None,
    })
}

fn allowed_global(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict")
            | ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_parameter")
    ) || (module == "torch" && storage_dtype(name).is_some())
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    file: &'a str,
}

impl<'a> Reader<'a> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::Archive {
            path: self.file.into(),
            message: format!("pickle at byte {}: {}", self.at, message.into()),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| self.err("truncated"))?;
        let slice = &self.data[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String> {
        let start = self.at;
        let end = self.data[start..]
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.err("unterminated line"))?;
        self.at = start + end + 1;
        Ok(String::from_utf8_lossy(&self.data[start..start + end]).into_owned())
    }

    fn string(&mut self, n: usize) -> Result<String> {
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("invalid UTF-8 string"))
    }
}

fn pop_mark(stack: &mut Vec<Value>) -> Option<Vec<Value>> {
    let mark = stack.iter().rposition(|v| matches!(v, Value::Mark))?;
    let items = stack.split_off(mark + 1);
    stack.pop();
    Some(items)
}

fn as_usize_list(value: &Value) -> Option<Vec<usize>> {
    match value {
        Value::Tuple(items) | Value::List(items) => items
            .items
            .iter()
            .map(|v| match v {
                Value::Int(i) if *i >= 0 => Some(*i as usize),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// Reads a state-dict pickle into tensor descriptions keyed by name.
pub fn read_state_dict(data: &[u8], file: &str) -> Result<BTreeMap<String, PickledTensor>> {
    let mut r = Reader { data, at: 0, file };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: BTreeMap<u32, Value> = BTreeMap::new();
    let pop =
        |stack: &mut Vec<Value>, r: &Reader| stack.pop().ok_or_else(|| r.err("stack underflow"));
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?;
            } // PROTO
            0x95 => {
                r.bytes(8)?;
            } // FRAME
            b'}' => stack.push(Value::Dict(Seq::empty())),
            b')' => stack.push(Value::Tuple(Seq::empty())),
            b']' => stack.push(Value::List(Seq::empty())),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Other),
            0x89 => stack.push(Value::Other),
            b'J' => {
                let v = r.u32()? as i32;
                stack.push(Value::Int(v as i64))
            }
            b'K' => {
                let v = r.u8()?;
                stack.push(Value::Int(v as i64))
            }
            b'M' => {
                let v = r.u16()?;
                stack.push(Value::Int(v as i64))
            }
            0x8a => {
                // LONG1
                let n = r.u8()? as usize;
                let b = r.bytes(n)?;
                if n > 8 {
                    return Err(r.err("integer too large"));
                }
                let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                    [0xFFu8; 8]
                } else {
                    [0u8; 8]
                };
                buf[..n].copy_from_slice(b);
                stack.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'G' => {
                let b = r.bytes(8)?;
                let mut buf = [0u8; 8];
                buf.copy_from_slice(b);
                let _ = f64::from_be_bytes(buf);
                stack.push(Value::Other);
            }
            b'X' => {
                let n = r.u32()? as usize;
                let s = r.string(n)?;
                stack.push(Value::Str(s.into()));
            }
            0x8c => {
                let n = r.u8()? as usize;
                let s = r.string(n)?;
                stack.push(Value::Str(s.into()));
            }
            b'q' => {
                let i = r.u8()? as u32;
                let top = stack
                    .last()
                    .cloned()
                    .ok_or_else(|| r.err("memo of empty stack"))?;
                memo.insert(i, top);
            }
            b'r' => {
                let i = r.u32()?;
                let top = stack
                    .last()
                    .cloned()
                    .ok_or_else(|| r.err("memo of empty stack"))?;
                memo.insert(i, top);
            }
            0x94 => {
                // MEMOIZE
                let i = memo.len() as u32;
                let top = stack
                    .last()
                    .cloned()
                    .ok_or_else(|| r.err("memo of empty stack"))?;
                memo.insert(i, top);
            }
            b'h' => {
                let i = r.u8()? as u32;
                let v = memo
                    .get(&i)
                    .cloned()
                    .ok_or_else(|| r.err(format!("unknown memo {i}")))?;
                stack.push(v);
            }
            b'j' => {
                let i = r.u32()?;
                let v = memo
                    .get(&i)
                    .cloned()
                    .ok_or_else(|| r.err(format!("unknown memo {i}")))?;
                stack.push(v);
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                if !allowed_global(&module, &name) {
                    return Err(r.err(format!(
                        "refusing global {module}.{name}: only tensors, storages and OrderedDict are read"
                    )));
                }
                stack.push(Value::Global(module, name));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop(&mut stack, &r)?;
                let module = pop(&mut stack, &r)?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err(r.err("STACK_GLOBAL without strings"));
                };
                if !allowed_global(&module, &name) {
                    return Err(r.err(format!(
                        "refusing global {module}.{name}: only tensors, storages and OrderedDict are read"
                    )));
                }
                stack.push(Value::Global(module.to_string(), name.to_string()));
            }
            b't' => {
                let items = pop_mark(&mut stack).ok_or_else(|| r.err("TUPLE without MARK"))?;
                stack.push(Value::Tuple(Seq::of(items, &r)?));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(r.err("stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(Seq::of(items, &r)?));
            }
            b'Q' => {
                // BINPERSID: ('storage', storage type, key, location, numel)
                let pid = pop(&mut stack, &r)?;
                let Value::Tuple(items) = pid else {
                    return Err(r.err("persistent id is not a tuple"));
                };
                match items.items.as_slice() {
                    [Value::Str(kind), Value::Global(_, storage), Value::Str(key), ..]
                        if &**kind == "storage" =>
                    {
                        let dtype = storage_dtype(storage)
                            .ok_or_else(|| r.err(format!("unsupported storage type {storage}")))?;
                        stack.push(Value::Storage {
                            key: key.to_string(),
                            dtype: dtype.to_owned(),
                        });
                    }
                    _ => return Err(r.err("persistent id is not a storage reference")),
                }
            }
            b'R' => {
                let args = pop(&mut stack, &r)?;
                let callable = pop(&mut stack, &r)?;
                let Value::Tuple(args) = args else {
                    return Err(r.err("REDUCE arguments are not a tuple"));
                };
                let args = args.items;
                let value = match callable {
                    Value::Global(m, n) if m == "collections" && n == "OrderedDict" => {
                        Value::Dict(Seq::empty())
                    }
                    Value::Global(_, n) if n == "_rebuild_tensor_v2" => {
                        let (
                            Some(Value::Storage { key, dtype }),
                            Some(Value::Int(offset)),
                            Some(size),
                            Some(stride),
                        ) = (
                            args.first(),
                            args.get(1),
                            args.get(2).and_then(as_usize_list),
                            args.get(3).and_then(as_usize_list),
                        )
                        else {
                            return Err(r.err("unexpected _rebuild_tensor_v2 arguments"));
                        };
                        Value::Tensor(PickledTensor {
                            storage: key.clone(),
                            dtype: dtype.clone(),
                            offset: usize::try_from(*offset).map_err(|_| {
                                r.err(format!("tensor storage offset {offset} is negative"))
                            })?,
                            shape: size,
                            stride,
                        })
                    }
                    Value::Global(_, n) if n == "_rebuild_parameter" => match args.first() {
                        Some(t @ Value::Tensor(_)) => t.clone(),
                        _ => return Err(r.err("unexpected _rebuild_parameter arguments")),
                    },
                    other => return Err(r.err(format!("cannot call {other:?}"))),
                };
                stack.push(value);
            }
            b'b' => {
                // BUILD: state of an OrderedDict or parameter; ignored.
                pop(&mut stack, &r)?;
            }
            b's' => {
                let value = pop(&mut stack, &r)?;
                let key = pop(&mut stack, &r)?;
                match stack.last_mut() {
                    Some(Value::Dict(items)) => items.extend(vec![(key, value)], &r)?,
                    _ => return Err(r.err("SETITEM on a non-dict")),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack).ok_or_else(|| r.err("SETITEMS without MARK"))?;
                let Some(Value::Dict(dict)) = stack.last_mut() else {
                    return Err(r.err("SETITEMS on a non-dict"));
                };
                let mut pairs = Vec::with_capacity(items.len() / 2);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                dict.extend(pairs, &r)?;
            }
            b'a' => {
                let value = pop(&mut stack, &r)?;
                match stack.last_mut() {
                    Some(Value::List(items)) => items.extend(vec![value], &r)?,
                    _ => return Err(r.err("APPEND on a non-list")),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack).ok_or_else(|| r.err("APPENDS without MARK"))?;
                match stack.last_mut() {
                    Some(Value::List(list)) => list.extend(items, &r)?,
                    _ => return Err(r.err("APPENDS on a non-list")),
                }
            }
            b'.' => break,
            other => return Err(r.err(format!("unsupported pickle opcode 0x{other:02x}"))),
        }
    }
    let Some(Value::Dict(items)) = stack.pop() else {
        return Err(r.err("the pickle is not a dict of tensors"));
    };
    let mut tensors = BTreeMap::new();
    for (key, value) in items.items.iter() {
        let (Value::Str(name), Value::Tensor(tensor)) = (key, value) else {
            continue;
        };
        tensors.insert(name.to_string(), tensor.clone());
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(pickle: &[u8]) -> String {
        match read_state_dict(pickle, "test.pkl") {
            Ok(_) => panic!("a hostile pickle was read"),
            Err(e) => e.to_string(),
        }
    }

    /// `N` and a million TUPLE1s: a million nested tuples overflowed the
    /// stack (the process aborted); now refused past the depth limit.
    #[test]
    fn deep_nesting_is_refused() {
        let mut pickle = vec![b'N'];
        pickle.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        pickle.push(b'.');
        let err = error_of(&pickle);
        assert!(err.contains("nest more than 256"), "{err}");
    }

    /// A list extended with two copies of itself, 40 times: deep copies of
    /// the memo grew it as 3^40; shared containers keep it linear.
    #[test]
    fn self_referencing_memo_stays_small() {
        let mut pickle = vec![b']', b'q', 0];
        for _ in 0..40 {
            pickle.extend_from_slice(&[b'h', 0, b'(', b'h', 0, b'h', 0, b'e', b'q', 0]);
        }
        pickle.push(b'.');
        let started = std::time::Instant::now();
        let err = error_of(&pickle);
        assert!(err.contains("not a dict of tensors"), "{err}");
        assert!(started.elapsed().as_secs_f32() < 1.0);
    }

    /// A `_rebuild_tensor_v2` with a storage offset of -1 is refused (it
    /// became a huge unsigned offset).
    #[test]
    fn a_negative_storage_offset_is_refused() {
        let mut pickle = vec![b'}'];
        // key
        pickle.extend_from_slice(&[0x8c, 1, b'w']);
        // _rebuild_tensor_v2(storage, -1, (2,), (1,))
        pickle.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pickle.extend_from_slice(b"(");
        pickle.extend_from_slice(&[0x8c, 7]);
        pickle.extend_from_slice(b"storage");
        pickle.extend_from_slice(b"ctorch\nFloatStorage\n");
        pickle.extend_from_slice(&[0x8c, 1, b'0', 0x8c, 3]);
        pickle.extend_from_slice(b"cpu");
        pickle.extend_from_slice(&[b'K', 2, b't', b'Q']);
        pickle.push(b'J');
        pickle.extend_from_slice(&(-1i32).to_le_bytes());
        pickle.extend_from_slice(&[b'K', 2, 0x85, b'K', 1, 0x85, b't', b'R', b's', b'.']);
        let err = error_of(&pickle);
        assert!(err.contains("offset -1 is negative"), "{err}");
    }
}
