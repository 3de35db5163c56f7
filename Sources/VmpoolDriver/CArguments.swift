import Foundation

/// A NULL-terminated array of C strings for `posix_spawn` and friends, freed after `body`.
public func withCStrings<T>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) throws -> T)
    rethrows -> T
{
    let pointers = strings.map { strdup($0) } + [nil]
    defer {
        for pointer in pointers { free(pointer) }
    }
    return try pointers.withUnsafeBufferPointer { try body($0.baseAddress!) }
}
