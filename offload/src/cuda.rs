//! The CUDA runtime calls the copy engine needs, resolved at run time from the libcudart that
//! libtorch already loaded (no CUDA toolkit at build time, no C++ shim). Where CUDA is absent
//! (no symbols, no driver, no device), [`runtime`] is None and the callers take their CPU paths.
//!
//! Streams: libtorch runs every kernel on the legacy default stream (handle 0) unless told
//! otherwise, and strata never tells it otherwise; copies run on a non-blocking stream of
//! their own and are ordered against the compute stream with events only.
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use tch::Tensor;

use crate::error::{OffloadError, Result};

type Stream = *mut c_void;
type Event = *mut c_void;

const SUCCESS: c_int = 0;
const NOT_READY: c_int = 600;
const HOST_TO_DEVICE: c_int = 1;
const DEVICE_TO_HOST: c_int = 2;
const STREAM_NON_BLOCKING: c_uint = 1;
const EVENT_DISABLE_TIMING: c_uint = 2;
const HOST_REGISTER_PORTABLE: c_uint = 1;
/// libtorch's compute stream: the legacy default stream.
const COMPUTE: Stream = std::ptr::null_mut();

/// Function pointers into libcudart.
pub struct Runtime {
    host_register: unsafe extern "C" fn(*mut c_void, usize, c_uint) -> c_int,
    host_unregister: unsafe extern "C" fn(*mut c_void) -> c_int,
    stream_create: unsafe extern "C" fn(*mut Stream, c_uint) -> c_int,
    stream_destroy: unsafe extern "C" fn(Stream) -> c_int,
    event_create: unsafe extern "C" fn(*mut Event, c_uint) -> c_int,
    event_record: unsafe extern "C" fn(Event, Stream) -> c_int,
    event_query: unsafe extern "C" fn(Event) -> c_int,
    event_synchronize: unsafe extern "C" fn(Event) -> c_int,
    event_destroy: unsafe extern "C" fn(Event) -> c_int,
    stream_wait_event: unsafe extern "C" fn(Stream, Event, c_uint) -> c_int,
    memcpy_async: unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int, Stream) -> c_int,
    set_device: unsafe extern "C" fn(c_int) -> c_int,
    mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

/// Looks a symbol up among the libraries already loaded (libtorch pulls in libcudart).
///
/// # Safety
/// `T` must be the function-pointer type of the C function named `name`.
unsafe fn sym<T: Copy>(name: &CStr) -> Option<T> {
    // SAFETY: dlsym with RTLD_DEFAULT searches the global scope; name is NUL-terminated.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: the caller guarantees T is the symbol's function-pointer type.
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

fn load() -> Option<Runtime> {
    if !tch::Cuda::is_available() {
        return None;
    }
    // SAFETY: each type below is the documented signature of the CUDA runtime function named.
    unsafe {
        Some(Runtime {
            host_register: sym(c"cudaHostRegister")?,
            host_unregister: sym(c"cudaHostUnregister")?,
            stream_create: sym(c"cudaStreamCreateWithFlags")?,
            stream_destroy: sym(c"cudaStreamDestroy")?,
            event_create: sym(c"cudaEventCreateWithFlags")?,
            event_record: sym(c"cudaEventRecord")?,
            event_query: sym(c"cudaEventQuery")?,
            event_synchronize: sym(c"cudaEventSynchronize")?,
            event_destroy: sym(c"cudaEventDestroy")?,
            stream_wait_event: sym(c"cudaStreamWaitEvent")?,
            memcpy_async: sym(c"cudaMemcpyAsync")?,
            set_device: sym(c"cudaSetDevice")?,
            mem_get_info: sym(c"cudaMemGetInfo")?,
            error_string: sym(c"cudaGetErrorString")?,
        })
    }
}

/// The CUDA runtime, when a CUDA device is usable in this process.
pub fn runtime() -> Option<&'static Runtime> {
    static RT: OnceLock<Option<Runtime>> = OnceLock::new();
    RT.get_or_init(load).as_ref()
}

impl Runtime {
    fn check(&self, code: c_int, op: &'static str) -> Result<()> {
        if code == SUCCESS {
            return Ok(());
        }
        // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.error_string)(code)) }.to_string_lossy().into_owned();
        Err(OffloadError::Io { path: "cuda".into(), op, source: std::io::Error::other(format!("error {code}: {msg}")) })
    }

    /// Free and total bytes of a device as the driver sees them (all processes together).
    pub fn memory(&self, device: usize) -> Result<(u64, u64)> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: plain runtime calls with pointers to live locals.
        unsafe {
            self.check((self.set_device)(device as c_int), "cudaSetDevice")?;
            self.check((self.mem_get_info)(&mut free, &mut total), "cudaMemGetInfo")?;
        }
        Ok((free as u64, total as u64))
    }

    /// Page-locks `[ptr, ptr + len)` so that copies from and to it are DMA, asynchronous.
    ///
    /// # Safety
    /// The range must be a live mapping of this process that outlives the registration
    /// (undone by [`Runtime::unregister`] before unmapping).
    pub unsafe fn register(&self, ptr: *mut u8, len: usize) -> Result<()> {
        // SAFETY: as the caller guarantees.
        self.check(unsafe { (self.host_register)(ptr.cast(), len, HOST_REGISTER_PORTABLE) }, "cudaHostRegister")
    }

    /// # Safety
    /// `ptr` must have been registered with [`Runtime::register`] and no copy may still use it.
    pub unsafe fn unregister(&self, ptr: *mut u8) -> Result<()> {
        // SAFETY: as the caller guarantees.
        self.check(unsafe { (self.host_unregister)(ptr.cast()) }, "cudaHostUnregister")
    }
}

/// A recorded CUDA event, destroyed on drop (CUDA defers the release until it completes).
pub struct CopyEvent {
    rt: &'static Runtime,
    ev: Event,
}

// SAFETY: a CUDA event handle may be queried and destroyed from any thread.
unsafe impl Send for CopyEvent {}

impl CopyEvent {
    /// Whether the copy has completed (never blocks).
    pub fn done(&self) -> Result<bool> {
        // SAFETY: ev is a live event created by this module.
        match unsafe { (self.rt.event_query)(self.ev) } {
            SUCCESS => Ok(true),
            NOT_READY => Ok(false),
            e => self.rt.check(e, "cudaEventQuery").map(|_| false),
        }
    }

    /// Blocks the calling thread until the copy has completed.
    pub fn wait(&self) -> Result<()> {
        // SAFETY: ev is a live event created by this module.
        self.rt.check(unsafe { (self.rt.event_synchronize)(self.ev) }, "cudaEventSynchronize")
    }
}

impl Drop for CopyEvent {
    fn drop(&mut self) {
        // SAFETY: ev was created by cudaEventCreateWithFlags and is destroyed once.
        unsafe { (self.rt.event_destroy)(self.ev) };
    }
}

/// A copy stream of one device, ordered against libtorch's compute stream by events.
pub struct CopyEngine {
    rt: &'static Runtime,
    device: c_int,
    stream: Stream,
}

// SAFETY: the stream handle is only used through the CUDA runtime, which is thread-safe.
unsafe impl Send for CopyEngine {}

impl CopyEngine {
    /// A non-blocking copy stream on CUDA device `device`; an error when CUDA is unavailable.
    pub fn new(device: usize) -> Result<CopyEngine> {
        let rt = runtime().ok_or_else(|| OffloadError::Io { path: "cuda".into(), op: "copy engine", source: std::io::Error::other("CUDA is not available") })?;
        let mut stream: Stream = std::ptr::null_mut();
        // SAFETY: plain runtime calls; stream is written through a valid pointer.
        unsafe {
            rt.check((rt.set_device)(device as c_int), "cudaSetDevice")?;
            rt.check((rt.stream_create)(&mut stream, STREAM_NON_BLOCKING), "cudaStreamCreateWithFlags")?;
        }
        Ok(CopyEngine { rt, device: device as c_int, stream })
    }

    fn record(&self, stream: Stream) -> Result<CopyEvent> {
        let rt = self.rt;
        let mut ev: Event = std::ptr::null_mut();
        // SAFETY: ev is written through a valid pointer and recorded on a live stream.
        unsafe {
            rt.check((rt.event_create)(&mut ev, EVENT_DISABLE_TIMING), "cudaEventCreateWithFlags")?;
            let e = CopyEvent { rt, ev };
            rt.check((rt.event_record)(ev, stream), "cudaEventRecord")?;
            Ok(e)
        }
    }

    /// The copy stream waits for everything queued on the compute stream so far.
    fn after_compute(&self) -> Result<()> {
        let rt = self.rt;
        // SAFETY: runtime calls on live handles.
        unsafe {
            rt.check((rt.set_device)(self.device), "cudaSetDevice")?;
            let ev = self.record(COMPUTE)?;
            rt.check((rt.stream_wait_event)(self.stream, ev.ev, 0), "cudaStreamWaitEvent")
        }
    }

    /// Starts copying the bytes of `src` (contiguous, on this device) to host memory at `dst`,
    /// after the compute that produced them. The returned event completes with the copy.
    ///
    /// # Safety
    /// `dst` must be page-locked host memory of at least `src`'s byte size that is neither read,
    /// written, nor freed, and `src` must stay alive, until the event has completed.
    pub unsafe fn device_to_host(&self, src: &Tensor, dst: *mut u8) -> Result<CopyEvent> {
        let len = src.numel() * src.kind().elt_size_in_bytes();
        self.after_compute()?;
        let rt = self.rt;
        // SAFETY: as the caller guarantees; src's storage is a device allocation of len bytes.
        unsafe { rt.check((rt.memcpy_async)(dst.cast(), src.data_ptr(), len, DEVICE_TO_HOST, self.stream), "cudaMemcpyAsync D2H")? };
        self.record(self.stream)
    }

    /// Starts copying host memory at `src` into `dst` (contiguous, on this device, freshly
    /// allocated by libtorch on the compute stream); compute queued after this call waits for
    /// the copy on the device, without blocking the host. The returned event completes with the
    /// copy.
    ///
    /// # Safety
    /// `src` must be page-locked host memory of at least `dst`'s byte size that is neither
    /// written nor freed until the event has completed.
    pub unsafe fn host_to_device(&self, src: *const u8, dst: &Tensor) -> Result<CopyEvent> {
        let len = dst.numel() * dst.kind().elt_size_in_bytes();
        // The new tensor's memory may have been freed by kernels still queued on the compute stream.
        self.after_compute()?;
        let rt = self.rt;
        // SAFETY: as the caller guarantees; dst's storage is a device allocation of len bytes.
        unsafe { rt.check((rt.memcpy_async)(dst.data_ptr(), src.cast(), len, HOST_TO_DEVICE, self.stream), "cudaMemcpyAsync H2D")? };
        let done = self.record(self.stream)?;
        // SAFETY: runtime call on live handles.
        unsafe { rt.check((rt.stream_wait_event)(COMPUTE, done.ev, 0), "cudaStreamWaitEvent")? };
        Ok(done)
    }
}

impl Drop for CopyEngine {
    fn drop(&mut self) {
        // SAFETY: the stream was created in `new`; CUDA lets queued work finish first.
        unsafe { (self.rt.stream_destroy)(self.stream) };
    }
}
