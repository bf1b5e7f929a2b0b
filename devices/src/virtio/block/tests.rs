//! virtio-blk tests with crafted queues: happy paths against a temp image (buffered and
//! O_DIRECT), read-only and locking, every invalid request the device must answer with
//! IOERR/UNSUPP, every malformed chain that must mark the device NEEDS_RESET, and EVENT_IDX
//! interrupt suppression.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::status::DEVICE_NEEDS_RESET;
use crate::virtio::test_utils::{
    clear_dirty, desc, guest_memory, is_dirty, ro, wo, Buf, TempFile, TestDriver, DATA_BASE,
    REGION_SIZE,
};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const DISK_SECTORS: u64 = 64;
const HDR: u64 = DATA_BASE;
const STATUS: u64 = DATA_BASE + 0x800;
const DATA: u64 = DATA_BASE + 0x1000;
const DATA2: u64 = DATA_BASE + 0x10_0000;
const OUTSIDE: u64 = 2 * REGION_SIZE;
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn image() -> TempFile {
    let contents: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
        .map(|i| (i / 512) as u8)
        .collect();
    TempFile::new(&contents)
}

fn config(path: &std::path::Path, read_only: bool, cache: CacheMode) -> BlockConfig {
    BlockConfig {
        id: "disk0".into(),
        path: path.to_owned(),
        read_only,
        cache,
    }
}

fn up<'m>(mem: &'m GuestMemoryMmap, block: Block) -> TestDriver<'m> {
    let mut d = TestDriver::new(mem, Box::new(block));
    let features = d.device_features();
    d.bring_up(features, 1, 256);
    d
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// Posts a request with `data` buffers between header and status, processes it, and
/// returns (status byte, used length).
fn request(d: &mut TestDriver<'_>, kind: u32, sector: u64, data: &[Buf]) -> (u8, u32) {
    let mut chain = vec![ro(HDR, 16)];
    chain.extend_from_slice(data);
    chain.push(wo(STATUS, 1));
    raw_request(d, kind, sector, &chain)
}

fn raw_request(d: &mut TestDriver<'_>, kind: u32, sector: u64, chain: &[Buf]) -> (u8, u32) {
    write_header(d.mem, kind, sector);
    d.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    let before = d.used_idx(0);
    d.add_chain(0, chain);
    d.process(0);
    assert_eq!(
        d.used_idx(0),
        before.wrapping_add(1),
        "request not completed"
    );
    let used = d.used_elem(0, before);
    (d.mem.read_obj(GuestAddress(STATUS)).unwrap(), used.len())
}

fn write_header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HDR)).unwrap();
}

fn file_bytes(file: &TempFile, sector: u64, len: usize) -> Vec<u8> {
    let all = std::fs::read(&file.path).unwrap();
    let start = (sector * SECTOR_SIZE) as usize;
    all[start..start + len].to_vec()
}

fn needs_reset(d: &mut TestDriver<'_>) -> bool {
    d.read(0x70) & DEVICE_NEEDS_RESET != 0
}

#[test]
fn read_write_flush_get_id_round_trip() {
    let img = image();
    let mem = guest_memory();
    let block = Block::new(config(&img.path, false, CacheMode::Writeback)).unwrap();
    assert_eq!(block.capacity(), DISK_SECTORS);
    let mut d = up(&mem, block);

    // OUT from two buffers, one straddling the boundary between the two memory regions.
    let data = pattern(1536, 1);
    mem.write_slice(&data[..512], GuestAddress(DATA)).unwrap();
    let straddle = REGION_SIZE - 512;
    mem.write_slice(&data[512..], GuestAddress(straddle))
        .unwrap();
    let (status, len) = request(&mut d, T_OUT, 3, &[ro(DATA, 512), ro(straddle, 1024)]);
    assert_eq!((status, len), (S_OK, 1));
    assert_eq!(file_bytes(&img, 3, 1536), data);

    // IN into fresh buffers; the VMM's writes must show in the dirty bitmap.
    clear_dirty(&mem);
    let (status, len) = request(
        &mut d,
        T_IN,
        3,
        &[wo(DATA2, 1024), wo(straddle - 4096, 512)],
    );
    assert_eq!((status, len), (S_OK, 1537));
    let mut back = vec![0u8; 1536];
    mem.read_slice(&mut back[..1024], GuestAddress(DATA2))
        .unwrap();
    mem.read_slice(&mut back[1024..], GuestAddress(straddle - 4096))
        .unwrap();
    assert_eq!(back, data);
    assert!(is_dirty(&mem, DATA2));
    assert!(is_dirty(&mem, straddle - 4096));
    assert!(is_dirty(&mem, STATUS));
    assert!(!is_dirty(&mem, DATA2 + 0x10_0000));

    let (status, len) = request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((status, len), (S_OK, 1));

    let (status, len) = request(&mut d, VIRTIO_BLK_T_GET_ID, 0, &[wo(DATA, 20)]);
    assert_eq!((status, len), (S_OK, 21));
    let mut id = [0xffu8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"disk0\0");
    assert!(id[5..].iter().all(|&b| b == 0));
    // A short GET_ID buffer gets what fits.
    let (status, len) = request(&mut d, VIRTIO_BLK_T_GET_ID, 0, &[wo(DATA2, 3)]);
    assert_eq!((status, len), (S_OK, 4));

    assert!(!needs_reset(&mut d));
}

#[test]
fn indirect_descriptor_table() {
    let img = image();
    let mem = guest_memory();
    let mut d = up(
        &mem,
        Block::new(config(&img.path, false, CacheMode::Writeback)).unwrap(),
    );
    let table = DATA_BASE + 0x20_0000;
    let w = VRING_DESC_F_WRITE as u16;
    let n = VRING_DESC_F_NEXT as u16;
    for (i, raw) in [
        desc(HDR, 16, n, 1),
        desc(DATA, 512, w | n, 2),
        desc(STATUS, 1, w, 0),
    ]
    .into_iter()
    .enumerate()
    {
        mem.write_obj(raw, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    write_header(&mem, T_IN, 5);
    d.add_raw(0, &[desc(table, 48, VRING_DESC_F_INDIRECT as u16, 0)], 0);
    d.process(0);
    assert_eq!(d.used_idx(0), 1);
    assert_eq!(d.used_elem(0, 0).len(), 513);
    let mut sector = vec![0u8; 512];
    mem.read_slice(&mut sector, GuestAddress(DATA)).unwrap();
    assert!(sector.iter().all(|&b| b == 5));
}

#[test]
fn direct_io_round_trip_aligned_and_bounced() {
    let img = image();
    let mem = guest_memory();
    let block = match Block::new(config(&img.path, false, CacheMode::None)) {
        Ok(block) => block,
        Err(BlockError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("skipped: the temp dir's filesystem does not support O_DIRECT");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut d = up(&mem, block);
    for (addr, seed) in [(DATA, 3u8), (DATA + 3, 9u8)] {
        let data = pattern(4096, seed);
        mem.write_slice(&data, GuestAddress(addr)).unwrap();
        assert_eq!(request(&mut d, T_OUT, 8, &[ro(addr, 4096)]), (S_OK, 1));
        assert_eq!(file_bytes(&img, 8, 4096), data);
        clear_dirty(&mem);
        let into = DATA2 + u64::from(seed);
        assert_eq!(request(&mut d, T_IN, 8, &[wo(into, 4096)]), (S_OK, 4097));
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(into)).unwrap();
        assert_eq!(back, data);
        assert!(is_dirty(&mem, into));
    }
}

#[test]
fn read_only_refuses_writes() {
    let img = image();
    let original = std::fs::read(&img.path).unwrap();
    let mem = guest_memory();
    let block = Block::new(config(&img.path, true, CacheMode::Writeback)).unwrap();
    assert_ne!(block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    let mut d = up(&mem, block);
    mem.write_slice(&pattern(512, 4), GuestAddress(DATA))
        .unwrap();
    assert_eq!(request(&mut d, T_OUT, 0, &[ro(DATA, 512)]), (S_IOERR, 1));
    assert_eq!(std::fs::read(&img.path).unwrap(), original);
    assert_eq!(request(&mut d, T_IN, 1, &[wo(DATA, 512)]), (S_OK, 513));
    assert_eq!(request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[]), (S_OK, 1));
}

#[test]
fn images_are_locked() {
    let img = image();
    let rw = Block::new(config(&img.path, false, CacheMode::Writeback)).unwrap();
    for read_only in [false, true] {
        let err = Block::new(config(&img.path, read_only, CacheMode::Writeback))
            .err()
            .expect("second open must fail");
        assert!(matches!(err, BlockError::Locked { .. }));
        assert!(
            err.to_string().contains(&*img.path.to_string_lossy()),
            "{err}"
        );
    }
    drop(rw);
    let ro1 = Block::new(config(&img.path, true, CacheMode::Writeback)).unwrap();
    let _ro2 = Block::new(config(&img.path, true, CacheMode::Writeback)).unwrap();
    assert!(Block::new(config(&img.path, false, CacheMode::Writeback)).is_err());
    drop(ro1);
}

#[test]
fn image_size_must_be_whole_sectors() {
    let img = TempFile::new(&[0u8; 1000]);
    let err = Block::new(config(&img.path, false, CacheMode::Writeback))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains(&*img.path.to_string_lossy()) && msg.contains("1000"),
        "{msg}"
    );
    let missing = config(
        std::path::Path::new("/nonexistent/disk.img"),
        false,
        CacheMode::Writeback,
    );
    let msg = Block::new(missing).err().unwrap().to_string();
    assert!(msg.contains("/nonexistent/disk.img"), "{msg}");
}

#[test]
fn config_space() {
    let img = image();
    let block = Block::new(config(&img.path, false, CacheMode::Writeback)).unwrap();
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
    let mut blk_size = [0u8; 4];
    block.read_config(20, &mut blk_size);
    assert_eq!(u32::from_le_bytes(blk_size), 512);
    let mut past_end = [0xffu8; 4];
    block.read_config(0x200, &mut past_end);
    assert_eq!(past_end, [0xff; 4], "untouched past the config space");
}

#[test]
fn invalid_requests_get_ioerr() {
    let img = image();
    let original = std::fs::read(&img.path).unwrap();
    let mem = guest_memory();
    let mut d = up(
        &mem,
        Block::new(config(&img.path, false, CacheMode::Writeback)).unwrap(),
    );
    let eight_mib = REGION_SIZE as u32;
    let cases: Vec<(&str, u32, u64, Vec<Buf>)> = vec![
        (
            "writable header",
            T_IN,
            0,
            vec![wo(HDR, 16), wo(DATA, 512), wo(STATUS, 1)],
        ),
        (
            "short header",
            T_IN,
            0,
            vec![ro(HDR, 8), wo(DATA, 512), wo(STATUS, 1)],
        ),
        (
            "header outside RAM",
            T_IN,
            0,
            vec![ro(OUTSIDE, 16), wo(STATUS, 1)],
        ),
        ("no header", T_IN, 0, vec![wo(STATUS, 1)]),
        (
            "data outside RAM",
            T_IN,
            0,
            vec![ro(HDR, 16), wo(OUTSIDE - 256, 512), wo(STATUS, 1)],
        ),
        (
            "IN into read-only data",
            T_IN,
            0,
            vec![ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)],
        ),
        (
            "OUT from writable data",
            T_OUT,
            0,
            vec![ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)],
        ),
        (
            "beyond capacity",
            T_IN,
            DISK_SECTORS - 1,
            vec![ro(HDR, 16), wo(DATA, 1024), wo(STATUS, 1)],
        ),
        (
            "sector overflow",
            T_OUT,
            u64::MAX,
            vec![ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)],
        ),
        (
            "partial sector",
            T_OUT,
            0,
            vec![ro(HDR, 16), ro(DATA, 100), wo(STATUS, 1)],
        ),
        (
            "over the size cap",
            T_OUT,
            0,
            vec![
                ro(HDR, 16),
                ro(0, eight_mib),
                ro(0, eight_mib),
                ro(0, eight_mib),
                ro(0, eight_mib),
                ro(0, eight_mib),
                wo(STATUS, 1),
            ],
        ),
        (
            "GET_ID without buffer",
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![ro(HDR, 16), wo(STATUS, 1)],
        ),
    ];
    for (what, kind, sector, chain) in cases {
        assert_eq!(
            raw_request(&mut d, kind, sector, &chain),
            (S_IOERR, 1),
            "{what}"
        );
    }
    for kind in [2, 11, 13, 0xff, 0x8000_0000] {
        assert_eq!(request(&mut d, kind, 0, &[]), (S_UNSUPP, 1), "type {kind}");
    }
    assert!(!needs_reset(&mut d));
    assert_eq!(std::fs::read(&img.path).unwrap(), original);
    // The device still works.
    assert_eq!(request(&mut d, T_IN, 2, &[wo(DATA, 512)]), (S_OK, 513));
}

/// Posts raw descriptors (written at table index 0, published as chains), processes
/// the queue, and checks the device asked for a reset and stopped.
fn assert_malformed(descs: &[virtio_queue::desc::RawDescriptor]) {
    let img = image();
    let mem = guest_memory();
    let mut d = up(
        &mem,
        Block::new(config(&img.path, false, CacheMode::Writeback)).unwrap(),
    );
    write_header(&mem, T_IN, 0);
    d.add_raw(0, descs, 0);
    d.process(0);
    assert!(needs_reset(&mut d), "{descs:?}");
    assert!(d.interrupts() > 0);
    // Further notifications are ignored until the driver resets the device.
    let used = d.used_idx(0);
    d.add_chain(0, &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
    d.process(0);
    assert_eq!(d.used_idx(0), used);
    d.write(0x70, 0);
    let features = d.device_features();
    d.bring_up(features, 1, 256);
    assert_eq!(request(&mut d, T_IN, 0, &[wo(DATA, 512)]), (S_OK, 513));
}

const N: u16 = VRING_DESC_F_NEXT as u16;
const W: u16 = VRING_DESC_F_WRITE as u16;

#[test]
fn looping_chain_needs_reset() {
    assert_malformed(&[desc(HDR, 16, N, 1), desc(DATA, 512, W | N, 0)]);
}

#[test]
fn next_outside_table_needs_reset() {
    assert_malformed(&[desc(HDR, 16, N, 999)]);
}

#[test]
fn read_only_status_needs_reset() {
    assert_malformed(&[
        desc(HDR, 16, N, 1),
        desc(DATA, 512, W | N, 2),
        desc(STATUS, 1, 0, 0),
    ]);
}

#[test]
fn empty_status_needs_reset() {
    assert_malformed(&[desc(HDR, 16, N, 1), desc(STATUS, 0, W, 0)]);
}

#[test]
fn status_outside_ram_needs_reset() {
    assert_malformed(&[desc(HDR, 16, N, 1), desc(OUTSIDE, 1, W, 0)]);
}

#[test]
fn indirect_table_outside_ram_needs_reset() {
    assert_malformed(&[desc(OUTSIDE, 48, VRING_DESC_F_INDIRECT as u16, 0)]);
}

#[test]
fn event_idx_one_interrupt_per_batch() {
    let img = image();
    let mem = guest_memory();
    let mut d = up(
        &mem,
        Block::new(config(&img.path, false, CacheMode::Writeback)).unwrap(),
    );
    write_header(&mem, T_IN, 1);
    d.set_used_event(0, 0);
    for i in 0..3 {
        d.add_chain(
            0,
            &[ro(HDR, 16), wo(DATA + i * 512, 512), wo(STATUS + i, 1)],
        );
    }
    d.process(0);
    assert_eq!(d.used_idx(0), 3);
    assert_eq!(d.interrupts(), 1, "one interrupt for the batch");
    assert_eq!(
        d.avail_event(0),
        3,
        "driver asked to notify at the next request"
    );

    // The driver only wants to hear about used index 10: no interrupt for one request.
    d.set_used_event(0, 10);
    d.add_chain(0, &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
    d.process(0);
    assert_eq!(d.used_idx(0), 4);
    assert_eq!(d.interrupts(), 0);
}

#[test]
fn requests_continue_after_save_and_restore() {
    let img = image();
    let mem = guest_memory();
    let block = Block::new(config(&img.path, false, CacheMode::Writeback)).unwrap();
    let mut d = up(&mem, block);
    let data = pattern(512, 3);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (status, _) = request(&mut d, T_OUT, 5, &[ro(DATA, 512)]);
    assert_eq!(status, S_OK);
    // A read the guest posted just before the save; its notification is lost with the
    // old process.
    write_header(&mem, T_IN, 5);
    d.add_chain(0, &[ro(HDR, 16), wo(DATA2, 512), wo(STATUS, 1)]);

    // The old device (and its image lock) goes before the new one opens the image.
    let path = img.path.clone();
    let mut d = d
        .save_and_restore(|| {
            Box::new(Block::new(config(&path, false, CacheMode::Writeback)).unwrap())
        })
        .unwrap();
    // Reactivation completed the posted read without the guest's help.
    assert_eq!(d.used_idx(0), 2);
    assert_eq!(d.used_elem(0, 1).len(), 513);
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA2)).unwrap();
    assert_eq!(back, data);
    d.t().resume();
    assert!(d.interrupts() > 0);

    let (status, len) = request(&mut d, T_IN, 5, &[wo(DATA, 512)]);
    assert_eq!((status, len), (S_OK, 513));
    assert_eq!(d.used_idx(0), 3);
    assert!(!needs_reset(&mut d));
}
