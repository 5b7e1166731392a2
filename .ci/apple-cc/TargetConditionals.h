/* Stand-in for the macOS SDK header of the same name, used only when CI
 * type-checks the Apple targets on Linux (see .ci/run): ring's C sources
 * include it, and nothing else from the SDK once RING_CORE_NOSTDLIBINC is
 * set. Real macOS builds use Xcode's SDK and never see this file. */
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_TV 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_SIMULATOR 0
