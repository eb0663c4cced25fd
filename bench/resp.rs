//! A minimal pipelined RESP2 client for the "ours vs Redis" benchmarks, shared by
//! `timer-service/benches/timers.rs` and `mailbox/benches/deposits.rs` (each includes this file
//! with `#[path]`). Protocol errors end the bench with exit status 2.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;

fn fail(message: std::fmt::Arguments<'_>) -> ! {
    eprintln!("redis client: {message}");
    std::process::exit(2)
}

#[derive(Debug)]
pub enum Reply {
    Status,
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn array(self) -> Vec<Reply> {
        match self {
            Reply::Array(Some(v)) => v,
            Reply::Array(None) => Vec::new(),
            other => fail(format_args!("expected an array, got {other:?}")),
        }
    }

    pub fn bulk(self) -> Vec<u8> {
        match self {
            Reply::Bulk(Some(v)) => v,
            other => fail(format_args!("expected a bulk string, got {other:?}")),
        }
    }

    pub fn ok(self) {
        match self {
            Reply::Status | Reply::Int(_) | Reply::Bulk(_) | Reply::Array(_) => {}
            Reply::Error(e) => fail(format_args!("redis error: {e}")),
        }
    }
}

pub struct Redis {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    pending: usize,
}

impl Redis {
    /// Connects with read and write buffers of `buffer_bytes` each.
    pub fn connect(addr: &str, buffer_bytes: usize) -> std::io::Result<Redis> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Redis {
            reader: BufReader::with_capacity(buffer_bytes, stream.try_clone()?),
            writer: BufWriter::with_capacity(buffer_bytes, stream),
            pending: 0,
        })
    }

    /// Queues a command of `argc` arguments; follow with exactly `argc` [`Self::arg`] calls.
    pub fn cmd(&mut self, argc: usize) -> &mut Self {
        write!(self.writer, "*{argc}\r\n").expect("write");
        self.pending += 1;
        self
    }

    pub fn arg(&mut self, a: &[u8]) -> &mut Self {
        write!(self.writer, "${}\r\n", a.len()).expect("write");
        self.writer.write_all(a).expect("write");
        self.writer.write_all(b"\r\n").expect("write");
        self
    }

    pub fn args(&mut self, args: &[&[u8]]) -> &mut Self {
        self.cmd(args.len());
        for a in args {
            self.arg(a);
        }
        self
    }

    /// Sends everything queued and reads one reply per command.
    pub fn exec(&mut self) -> std::io::Result<Vec<Reply>> {
        self.writer.flush()?;
        let n = std::mem::take(&mut self.pending);
        (0..n).map(|_| self.read()).collect()
    }

    pub fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        self.args(args);
        Ok(self.exec()?.pop().expect("one reply"))
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    pub fn read(&mut self) -> std::io::Result<Reply> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(1);
        let int = |s: &str| -> i64 { s.parse().expect("RESP integer") };
        Ok(match kind {
            "+" => Reply::Status,
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Int(int(rest)),
            "$" => match int(rest) {
                -1 => Reply::Bulk(None),
                len => {
                    let mut buf = vec![0u8; len as usize + 2];
                    self.reader.read_exact(&mut buf)?;
                    buf.truncate(len as usize);
                    Reply::Bulk(Some(buf))
                }
            },
            "*" => match int(rest) {
                -1 => Reply::Array(None),
                len => Reply::Array(Some(
                    (0..len)
                        .map(|_| self.read())
                        .collect::<std::io::Result<_>>()?,
                )),
            },
            _ => fail(format_args!("bad RESP line {line:?}")),
        })
    }

    pub fn info_field(&mut self, section: &str, field: &str) -> String {
        let text = String::from_utf8(self.call(&[b"INFO", section.as_bytes()]).unwrap().bulk())
            .expect("INFO text");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")).map(str::to_owned))
            .unwrap_or_else(|| fail(format_args!("INFO {section} has no {field}")))
    }

    pub fn config_get(&mut self, key: &str) -> String {
        let mut v = self
            .call(&[b"CONFIG", b"GET", key.as_bytes()])
            .unwrap()
            .array();
        String::from_utf8(v.pop().expect("CONFIG GET value").bulk()).expect("UTF-8")
    }
}
