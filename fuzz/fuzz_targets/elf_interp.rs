//! The ELF interpreter reader (`gate::interp`): what a program's first
//! bytes say it loads, read the lenient way and the kernel's way, whether it
//! is a loader itself, and the pairing of a program with its interpreter's
//! load fed those bytes as the head of the file.
#![no_main]

use epm_agent::gate::interp::{
    HEAD_BYTES, InterpreterLoads, Pairing, interpreter, is_loader, loaded_interpreter,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lenient = interpreter(data);
    let kernel = loaded_interpreter(data);
    if let Some(path) = kernel {
        // What the kernel will open, the lenient reader sees too.
        assert_eq!(lenient, Some(path));
    }
    if let Some(path) = lenient {
        assert!(path.starts_with('/'));
        assert!(!is_loader(data));
    }
    let mut loads = InterpreterLoads::default();
    let head = &data[..data.len().min(HEAD_BYTES)];
    let read = |buf: &mut [u8]| {
        buf[..head.len()].copy_from_slice(head);
        Some(head.len())
    };
    let pairing = loads.event(7, (1, 10), "/usr/bin/prog", read, |_| Some((1, 20)));
    match pairing {
        Pairing::Expecting(event) => {
            assert!(loaded_interpreter(head).is_some());
            loads.answered(7, event, true);
            // The interpreter's own event pairs with the program.
            let next = loads.event(7, (1, 20), "/lib/ld.so", |_| None, |_| None);
            assert_eq!(next, Pairing::LoadOf("/usr/bin/prog".into()));
        }
        Pairing::None => assert!(loaded_interpreter(head).is_none()),
        Pairing::LoadOf(_) => panic!("a first event is never a load"),
    }
});
