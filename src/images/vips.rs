//! libvips, loaded when image transforms are first configured (`dlopen`
//! of `libvips.so.42`), so the binary needs no image library unless a
//! config turns images on, and `--check` names a missing one.
//!
//! Only the operations the transform pipeline uses are bound. Each is a C
//! varargs call ending in a NULL-terminated list of optional arguments;
//! the wrappers below pass ints as `c_int`, doubles as `f64` and enums as
//! `c_int`, as C's default argument promotions expect. [`Image`] owns one
//! reference to a `VipsImage` and releases it when dropped.
//!
//! libvips runs every operation lazily: pixels are computed when the final
//! image is saved. The buffer an image was loaded from must outlive it
//! (the loaders read it in place): the pipeline borrows its input for its
//! whole run.

// Each wrapper is the libvips operation of the same name (libvips' docs).
#![allow(missing_docs)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::{null, null_mut, NonNull};
use std::sync::OnceLock;

/// libvips' image object (opaque here).
#[repr(C)]
pub struct VipsImage {
    _opaque: [u8; 0],
}

type Out = *mut *mut VipsImage;
type Img = *mut VipsImage;

/// The entry points used, resolved once.
struct Api {
    error_buffer: unsafe extern "C" fn() -> *const c_char,
    error_clear: unsafe extern "C" fn(),
    g_free: unsafe extern "C" fn(*mut c_void),
    g_object_unref: unsafe extern "C" fn(*mut c_void),
    new_from_buffer: unsafe extern "C" fn(*const c_void, usize, *const c_char, ...) -> Img,
    get_width: unsafe extern "C" fn(Img) -> c_int,
    get_height: unsafe extern "C" fn(Img) -> c_int,
    get_bands: unsafe extern "C" fn(Img) -> c_int,
    hasalpha: unsafe extern "C" fn(Img) -> c_int,
    get_int: unsafe extern "C" fn(Img, *const c_char, *mut c_int) -> c_int,
    thumbnail_buffer: unsafe extern "C" fn(*mut c_void, usize, Out, c_int, ...) -> c_int,
    extract_area: unsafe extern "C" fn(Img, Out, c_int, c_int, c_int, c_int, ...) -> c_int,
    embed: unsafe extern "C" fn(Img, Out, c_int, c_int, c_int, c_int, ...) -> c_int,
    rot: IntOp,
    flip: IntOp,
    colourspace: IntOp,
    cast: IntOp,
    gaussblur: FloatOp,
    rotate: FloatOp,
    sharpen: unsafe extern "C" fn(Img, Out, ...) -> c_int,
    flatten: unsafe extern "C" fn(Img, Out, ...) -> c_int,
    addalpha: unsafe extern "C" fn(Img, Out, ...) -> c_int,
    copy: unsafe extern "C" fn(Img, Out, ...) -> c_int,
    linear: unsafe extern "C" fn(Img, Out, *const f64, *const f64, c_int, ...) -> c_int,
    text: unsafe extern "C" fn(Out, *const c_char, ...) -> c_int,
    new_from_image: unsafe extern "C" fn(Img, *const f64, c_int) -> Img,
    bandjoin2: unsafe extern "C" fn(Img, Img, Out, ...) -> c_int,
    composite2: unsafe extern "C" fn(Img, Img, Out, c_int, ...) -> c_int,
    replicate: unsafe extern "C" fn(Img, Out, c_int, c_int, ...) -> c_int,
    array_double_new: unsafe extern "C" fn(*const f64, c_int) -> *mut c_void,
    area_unref: unsafe extern "C" fn(*mut c_void),
    jpegsave_buffer: Saver,
    pngsave_buffer: Saver,
    webpsave_buffer: Saver,
    heifsave_buffer: Saver,
}

type Saver = unsafe extern "C" fn(Img, *mut *mut c_void, *mut usize, ...) -> c_int;
/// An operation of one image and one int (an enum) argument.
type IntOp = unsafe extern "C" fn(Img, Out, c_int, ...) -> c_int;
/// An operation of one image and one double argument.
type FloatOp = unsafe extern "C" fn(Img, Out, f64, ...) -> c_int;

/// The loaded library: the process's one copy, or why there is none.
static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// The library file looked for (Debian: `libvips42`).
pub const LIBRARY: &str = "libvips.so.42";

/// Loads and initialises libvips once: `Err` says why it cannot be used.
/// Its own thread pool is cut to one thread per operation (the transform
/// pool bounds the process's image work) and its operation cache is off
/// (variants are cached as ordinary entries).
pub fn load() -> Result<(), String> {
    match API.get_or_init(open) {
        Ok(_) => Ok(()),
        Err(e) => Err(e.clone()),
    }
}

fn api() -> Result<&'static Api, String> {
    match API.get_or_init(open) {
        Ok(a) => Ok(a),
        Err(e) => Err(e.clone()),
    }
}

fn open() -> Result<Api, String> {
    let name = CString::new(LIBRARY).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is never
    // closed (the functions resolved from it live as long as the process).
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!(
            "image transforms need libvips ({LIBRARY}; Debian: apt install libvips42): {}",
            dl_error()
        ));
    }
    let sym = |name: &str| -> Result<*mut c_void, String> {
        let c = CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: `handle` is a live dlopen handle and `c` a valid C string;
        // dlsym searches the library and the libraries it depends on
        // (glib's g_free and g_object_unref among them).
        let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
        if p.is_null() {
            Err(format!("{LIBRARY} has no {name}: {}", dl_error()))
        } else {
            Ok(p)
        }
    };
    macro_rules! bind {
        ($name:literal) => {{
            let p = sym($name)?;
            // SAFETY: `p` is the address of the C function `$name`, whose
            // prototype in libvips' (or glib's) headers is the field's type.
            unsafe { as_fn(p) }
        }};
    }
    let api = Api {
        error_buffer: bind!("vips_error_buffer"),
        error_clear: bind!("vips_error_clear"),
        g_free: bind!("g_free"),
        g_object_unref: bind!("g_object_unref"),
        new_from_buffer: bind!("vips_image_new_from_buffer"),
        get_width: bind!("vips_image_get_width"),
        get_height: bind!("vips_image_get_height"),
        get_bands: bind!("vips_image_get_bands"),
        hasalpha: bind!("vips_image_hasalpha"),
        get_int: bind!("vips_image_get_int"),
        thumbnail_buffer: bind!("vips_thumbnail_buffer"),
        extract_area: bind!("vips_extract_area"),
        embed: bind!("vips_embed"),
        rot: bind!("vips_rot"),
        flip: bind!("vips_flip"),
        colourspace: bind!("vips_colourspace"),
        cast: bind!("vips_cast"),
        gaussblur: bind!("vips_gaussblur"),
        rotate: bind!("vips_rotate"),
        sharpen: bind!("vips_sharpen"),
        flatten: bind!("vips_flatten"),
        addalpha: bind!("vips_addalpha"),
        copy: bind!("vips_copy"),
        linear: bind!("vips_linear"),
        text: bind!("vips_text"),
        new_from_image: bind!("vips_image_new_from_image"),
        bandjoin2: bind!("vips_bandjoin2"),
        composite2: bind!("vips_composite2"),
        replicate: bind!("vips_replicate"),
        array_double_new: bind!("vips_array_double_new"),
        area_unref: bind!("vips_area_unref"),
        jpegsave_buffer: bind!("vips_jpegsave_buffer"),
        pngsave_buffer: bind!("vips_pngsave_buffer"),
        webpsave_buffer: bind!("vips_webpsave_buffer"),
        heifsave_buffer: bind!("vips_heifsave_buffer"),
    };
    let init: unsafe extern "C" fn(*const c_char) -> c_int = bind!("vips_init");
    let concurrency: unsafe extern "C" fn(c_int) = bind!("vips_concurrency_set");
    let cache_max: unsafe extern "C" fn(c_int) = bind!("vips_cache_set_max");
    // SAFETY: libvips' documented start-up: vips_init once before any other
    // call (OnceLock runs this once), then its settings.
    unsafe {
        if init(c"yatagarasu".as_ptr()) != 0 {
            return Err(format!("libvips failed to start: {}", last_error(&api)));
        }
        concurrency(1);
        cache_max(0);
    }
    // Loaders libvips marks untrusted (ImageMagick, PDF, MATLAB, ...) stay
    // off: only the formats the pipeline sniffed reach it (8.13+).
    if let Ok(p) = sym("vips_block_untrusted_set") {
        // SAFETY: `void vips_block_untrusted_set(gboolean)`.
        let block: unsafe extern "C" fn(c_int) = unsafe { as_fn(p) };
        // SAFETY: a plain setter, after vips_init.
        unsafe { block(1) };
    }
    Ok(api)
}

/// A symbol's address as the function pointer type `F`.
///
/// # Safety
/// `p` must be the address of a function whose C prototype is `F`.
unsafe fn as_fn<F: Copy>(p: *mut c_void) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: same size (checked); the caller vouches for the prototype.
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a valid C string owned by libc.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "unknown error".into();
    }
    // SAFETY: non-NULL, NUL-terminated (above).
    unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
}

/// libvips' error text for the last failure on this thread's calls, and
/// clears it.
fn last_error(api: &Api) -> String {
    // SAFETY: vips_error_buffer returns a valid C string owned by libvips;
    // it is copied before vips_error_clear frees it.
    unsafe {
        let p = (api.error_buffer)();
        let s = if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().trim().to_string()
        };
        (api.error_clear)();
        if s.is_empty() {
            "libvips failed".into()
        } else {
            s
        }
    }
}

/// The NULL that ends every optional-argument list.
const END: *const c_char = null();

/// One image (a lazy pipeline until saved).
pub struct Image {
    ptr: NonNull<VipsImage>,
    api: &'static Api,
}

// SAFETY: a VipsImage may be used from any thread (libvips is thread-safe
// after vips_init); an `Image` is used by one thread at a time.
unsafe impl Send for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: `ptr` holds one reference, released once here.
        unsafe { (self.api.g_object_unref)(self.ptr.as_ptr().cast()) }
    }
}

/// Turns an operation's status and output into an [`Image`].
fn made(api: &'static Api, rc: c_int, out: Img) -> Result<Image, String> {
    match NonNull::new(out) {
        Some(ptr) if rc == 0 => Ok(Image { ptr, api }),
        Some(ptr) => {
            drop(Image { ptr, api });
            Err(last_error(api))
        }
        None => Err(last_error(api)),
    }
}

/// `VipsSize`: how `thumbnail` may scale.
pub const SIZE_FORCE: c_int = 3;
/// `VipsInteresting`: what a smart crop keeps.
pub const INTERESTING_ATTENTION: c_int = 3;
/// `VipsAngle`.
pub const ANGLE_D90: c_int = 1;
/// `VipsDirection`.
pub const DIRECTION_HORIZONTAL: c_int = 0;
/// `VipsDirection`.
pub const DIRECTION_VERTICAL: c_int = 1;
/// `VipsInterpretation`.
pub const INTERPRETATION_B_W: c_int = 1;
/// `VipsInterpretation`.
pub const INTERPRETATION_LCH: c_int = 19;
/// `VipsInterpretation`.
pub const INTERPRETATION_SRGB: c_int = 22;
/// `VipsBandFormat`.
pub const FORMAT_UCHAR: c_int = 0;
/// `VipsBlendMode`.
const BLEND_OVER: c_int = 2;
/// `VipsExtend`.
const EXTEND_BACKGROUND: c_int = 5;
/// `VipsForeignHeifCompression`: AV1 (an AVIF file).
const HEIF_AV1: c_int = 4;

/// A `VipsArrayDouble` argument, released after the call.
struct Doubles {
    ptr: *mut c_void,
    api: &'static Api,
}

impl Doubles {
    fn new(api: &'static Api, values: &[f64]) -> Doubles {
        // SAFETY: copies `values` into a new libvips array.
        let ptr = unsafe { (api.array_double_new)(values.as_ptr(), values.len() as c_int) };
        Doubles { ptr, api }
    }
}

impl Drop for Doubles {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the one reference array_double_new returned.
            unsafe { (self.api.area_unref)(self.ptr) }
        }
    }
}

/// Decoded-header facts of an image.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    /// EXIF orientation 1-8 (1: none).
    pub orientation: u32,
}

/// Reads the header of the image in `buf` (no pixels are decoded).
pub fn header(buf: &[u8]) -> Result<Header, String> {
    let api = api()?;
    // SAFETY: `buf` outlives the image, dropped before returning.
    let out = unsafe { (api.new_from_buffer)(buf.as_ptr().cast(), buf.len(), c"".as_ptr(), END) };
    let img = made(api, 0, out)?;
    let mut orientation: c_int = 1;
    // SAFETY: a live image and a valid out pointer; a missing field leaves
    // `orientation` at 1 (the call fails, its error cleared).
    unsafe {
        if (api.get_int)(img.ptr.as_ptr(), c"orientation".as_ptr(), &mut orientation) != 0 {
            orientation = 1;
            (api.error_clear)();
        }
    }
    Ok(Header {
        width: img.width(),
        height: img.height(),
        orientation: orientation.clamp(1, 8) as u32,
    })
}

/// How [`thumbnail`] meets its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thumb {
    /// Scaled to exactly the size (the plan has kept the aspect).
    Exact,
    /// Scaled to cover the size, cropped to it around what draws the eye
    /// (libvips' attention measure). A crop after an exact thumbnail
    /// cannot do this: its decode is sequential, and finding the
    /// interesting part reads the image twice.
    Smart,
}

/// Decodes `buf` scaled to `width` x `height` as `how` says (shrinking on
/// load where the format allows: JPEG decodes at 1/2, 1/4, 1/8), turned
/// upright by its EXIF orientation unless `no_rotate`.
pub fn thumbnail(
    buf: &[u8],
    (width, height): (u32, u32),
    how: Thumb,
    no_rotate: bool,
) -> Result<Image, String> {
    let api = api()?;
    let (option, value) = match how {
        Thumb::Exact => (c"size", SIZE_FORCE),
        Thumb::Smart => (c"crop", INTERESTING_ATTENTION),
    };
    let mut out = null_mut();
    // SAFETY: `buf` outlives the image (see the module note); libvips does
    // not write through the pointer despite its `void *` type; the option
    // values are enums passed as C ints.
    let rc = unsafe {
        (api.thumbnail_buffer)(
            buf.as_ptr() as *mut c_void,
            buf.len(),
            &mut out,
            width as c_int,
            c"height".as_ptr(),
            height as c_int,
            option.as_ptr(),
            value,
            c"no_rotate".as_ptr(),
            c_int::from(no_rotate),
            END,
        )
    };
    made(api, rc, out)
}

/// Renders `text` (Pango markup off: the text is escaped by the caller) in
/// `font` at 72 dpi (points = pixels): a one-band mask, 255 where ink is.
pub fn text(text: &str, font: &str) -> Result<Image, String> {
    let api = api()?;
    let t = CString::new(text).map_err(|_| "text holds a NUL".to_string())?;
    let f = CString::new(font).map_err(|_| "font holds a NUL".to_string())?;
    let mut out = null_mut();
    // SAFETY: valid C strings, live for the call.
    let rc = unsafe {
        (api.text)(
            &mut out,
            t.as_ptr(),
            c"font".as_ptr(),
            f.as_ptr(),
            c"dpi".as_ptr(),
            72 as c_int,
            END,
        )
    };
    made(api, rc, out)
}

impl Image {
    pub fn width(&self) -> u32 {
        // SAFETY: a live image.
        unsafe { (self.api.get_width)(self.ptr.as_ptr()) }.max(0) as u32
    }

    pub fn height(&self) -> u32 {
        // SAFETY: a live image.
        unsafe { (self.api.get_height)(self.ptr.as_ptr()) }.max(0) as u32
    }

    pub fn bands(&self) -> u32 {
        // SAFETY: a live image.
        unsafe { (self.api.get_bands)(self.ptr.as_ptr()) }.max(0) as u32
    }

    pub fn has_alpha(&self) -> bool {
        // SAFETY: a live image.
        unsafe { (self.api.hasalpha)(self.ptr.as_ptr()) != 0 }
    }

    fn p(&self) -> Img {
        self.ptr.as_ptr()
    }

    pub fn crop(&self, left: u32, top: u32, width: u32, height: u32) -> Result<Image, String> {
        let mut out = null_mut();
        // SAFETY: a live input and a valid out pointer; ints as C ints.
        let rc = unsafe {
            (self.api.extract_area)(
                self.p(),
                &mut out,
                left as c_int,
                top as c_int,
                width as c_int,
                height as c_int,
                END,
            )
        };
        made(self.api, rc, out)
    }

    /// Places the image at (`x`, `y`) on a `width` x `height` canvas of
    /// `background` (one value per band).
    pub fn embed(
        &self,
        (x, y): (u32, u32),
        (width, height): (u32, u32),
        background: &[f64],
    ) -> Result<Image, String> {
        let bg = Doubles::new(self.api, background);
        let mut out = null_mut();
        // SAFETY: as `crop`; `bg` lives across the call.
        let rc = unsafe {
            (self.api.embed)(
                self.p(),
                &mut out,
                x as c_int,
                y as c_int,
                width as c_int,
                height as c_int,
                c"extend".as_ptr(),
                EXTEND_BACKGROUND,
                c"background".as_ptr(),
                bg.ptr,
                END,
            )
        };
        made(self.api, rc, out)
    }

    /// `op` with one int argument and no options.
    fn with_int(&self, op: IntOp, arg: c_int) -> Result<Image, String> {
        let mut out = null_mut();
        // SAFETY: a live input, a valid out pointer, the int as a C int.
        let rc = unsafe { op(self.p(), &mut out, arg, END) };
        made(self.api, rc, out)
    }

    /// `op` with one double argument and no options.
    fn with_float(&self, op: FloatOp, arg: f64) -> Result<Image, String> {
        let mut out = null_mut();
        // SAFETY: a live input, a valid out pointer, the double as a double.
        let rc = unsafe { op(self.p(), &mut out, arg, END) };
        made(self.api, rc, out)
    }

    /// Rotates by a multiple of 90 degrees clockwise (`angle`: `VipsAngle`).
    pub fn rot(&self, angle: c_int) -> Result<Image, String> {
        self.with_int(self.api.rot, angle)
    }

    pub fn flip(&self, direction: c_int) -> Result<Image, String> {
        self.with_int(self.api.flip, direction)
    }

    pub fn colourspace(&self, space: c_int) -> Result<Image, String> {
        self.with_int(self.api.colourspace, space)
    }

    pub fn cast(&self, format: c_int) -> Result<Image, String> {
        self.with_int(self.api.cast, format)
    }

    pub fn gaussblur(&self, sigma: f64) -> Result<Image, String> {
        self.with_float(self.api.gaussblur, sigma)
    }

    /// Rotates by any angle (degrees, clockwise), the corners transparent
    /// for an image with alpha.
    pub fn rotate(&self, degrees: f64) -> Result<Image, String> {
        self.with_float(self.api.rotate, degrees)
    }

    pub fn sharpen(&self, sigma: f64) -> Result<Image, String> {
        let mut out = null_mut();
        // SAFETY: as `crop`; the option is a double.
        let rc = unsafe { (self.api.sharpen)(self.p(), &mut out, c"sigma".as_ptr(), sigma, END) };
        made(self.api, rc, out)
    }

    /// Drops alpha onto `background` (RGB).
    pub fn flatten(&self, background: &[f64]) -> Result<Image, String> {
        let bg = Doubles::new(self.api, background);
        let mut out = null_mut();
        // SAFETY: as `crop`; `bg` lives across the call.
        let rc =
            unsafe { (self.api.flatten)(self.p(), &mut out, c"background".as_ptr(), bg.ptr, END) };
        made(self.api, rc, out)
    }

    /// Adds an opaque alpha band.
    pub fn addalpha(&self) -> Result<Image, String> {
        let mut out = null_mut();
        // SAFETY: as `crop`.
        let rc = unsafe { (self.api.addalpha)(self.p(), &mut out, END) };
        made(self.api, rc, out)
    }

    /// The same pixels, read as `interpretation` (a band count it fits).
    pub fn copy_as(&self, interpretation: c_int) -> Result<Image, String> {
        let mut out = null_mut();
        // SAFETY: as `crop`; the option is an enum passed as a C int.
        let rc = unsafe {
            (self.api.copy)(
                self.p(),
                &mut out,
                c"interpretation".as_ptr(),
                interpretation,
                END,
            )
        };
        made(self.api, rc, out)
    }

    /// `a * band + b`, per band (`a`, `b`: one value per band), as 8-bit.
    pub fn linear(&self, a: &[f64], b: &[f64]) -> Result<Image, String> {
        self.linear_as(a, b, true)
    }

    /// [`Self::linear`] keeping floats (for a colour space such as LCh).
    pub fn linear_float(&self, a: &[f64], b: &[f64]) -> Result<Image, String> {
        self.linear_as(a, b, false)
    }

    fn linear_as(&self, a: &[f64], b: &[f64], uchar: bool) -> Result<Image, String> {
        if a.len() != b.len() || a.is_empty() {
            return Err("linear: one factor and one offset per band".into());
        }
        let mut out = null_mut();
        // SAFETY: both arrays hold `len` doubles and live across the call.
        let rc = unsafe {
            (self.api.linear)(
                self.p(),
                &mut out,
                a.as_ptr(),
                b.as_ptr(),
                a.len() as c_int,
                c"uchar".as_ptr(),
                c_int::from(uchar),
                END,
            )
        };
        made(self.api, rc, out)
    }

    /// An image of this one's size holding `pixel` everywhere.
    pub fn constant(&self, pixel: &[f64]) -> Result<Image, String> {
        // SAFETY: `pixel` holds `len` doubles, copied by the call.
        let out =
            unsafe { (self.api.new_from_image)(self.p(), pixel.as_ptr(), pixel.len() as c_int) };
        made(self.api, 0, out)
    }

    pub fn bandjoin(&self, other: &Image) -> Result<Image, String> {
        let mut out = null_mut();
        // SAFETY: two live inputs and a valid out pointer.
        let rc = unsafe { (self.api.bandjoin2)(self.p(), other.p(), &mut out, END) };
        made(self.api, rc, out)
    }

    /// `overlay` over this image with its top-left at (`x`, `y`) (may be
    /// negative or past the edges: clipped).
    pub fn composite(&self, overlay: &Image, x: i32, y: i32) -> Result<Image, String> {
        let mut out = null_mut();
        // SAFETY: two live inputs; the mode and offsets are C ints.
        let rc = unsafe {
            (self.api.composite2)(
                self.p(),
                overlay.p(),
                &mut out,
                BLEND_OVER,
                c"x".as_ptr(),
                x as c_int,
                c"y".as_ptr(),
                y as c_int,
                END,
            )
        };
        made(self.api, rc, out)
    }

    /// The image repeated `across` x `down` times.
    pub fn replicate(&self, across: u32, down: u32) -> Result<Image, String> {
        let mut out = null_mut();
        // SAFETY: as `crop`.
        let rc = unsafe {
            (self.api.replicate)(self.p(), &mut out, across as c_int, down as c_int, END)
        };
        made(self.api, rc, out)
    }

    /// Encodes (and so computes) the image.
    pub fn save(&self, format: SaveAs) -> Result<Vec<u8>, String> {
        let mut buf: *mut c_void = null_mut();
        let mut len: usize = 0;
        // SAFETY: a live input and valid out pointers; every option value is
        // a C int; the buffer libvips allocates is copied, then g_free'd.
        let rc = unsafe {
            match format {
                SaveAs::Jpeg { quality } => (self.api.jpegsave_buffer)(
                    self.p(),
                    &mut buf,
                    &mut len,
                    c"Q".as_ptr(),
                    quality as c_int,
                    c"strip".as_ptr(),
                    1 as c_int,
                    c"optimize_coding".as_ptr(),
                    1 as c_int,
                    END,
                ),
                SaveAs::Png => (self.api.pngsave_buffer)(
                    self.p(),
                    &mut buf,
                    &mut len,
                    c"strip".as_ptr(),
                    1 as c_int,
                    c"compression".as_ptr(),
                    6 as c_int,
                    END,
                ),
                SaveAs::Webp { quality } => (self.api.webpsave_buffer)(
                    self.p(),
                    &mut buf,
                    &mut len,
                    c"Q".as_ptr(),
                    quality as c_int,
                    c"strip".as_ptr(),
                    1 as c_int,
                    END,
                ),
                SaveAs::Avif { quality } => (self.api.heifsave_buffer)(
                    self.p(),
                    &mut buf,
                    &mut len,
                    c"Q".as_ptr(),
                    quality as c_int,
                    c"compression".as_ptr(),
                    HEIF_AV1,
                    c"strip".as_ptr(),
                    1 as c_int,
                    END,
                ),
            }
        };
        if rc != 0 || buf.is_null() {
            if !buf.is_null() {
                // SAFETY: allocated by libvips with g_malloc.
                unsafe { (self.api.g_free)(buf) };
            }
            return Err(last_error(self.api));
        }
        // SAFETY: libvips wrote `len` bytes at `buf`; copied, then freed.
        let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) }.to_vec();
        // SAFETY: allocated by libvips with g_malloc, freed once.
        unsafe { (self.api.g_free)(buf) };
        Ok(bytes)
    }
}

/// An encoder and its settings.
#[derive(Debug, Clone, Copy)]
pub enum SaveAs {
    Jpeg { quality: u8 },
    Png,
    Webp { quality: u8 },
    Avif { quality: u8 },
}
