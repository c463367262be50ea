import ChatBridgeCore
import Crypto
import Foundation
import _CryptoExtras

/// Webhook encryption and signatures (protocols E.1).
public enum LarkCrypto {
    public struct Failure: Error, Sendable, CustomStringConvertible {
        public var description: String
    }

    /// Decrypts `{"encrypt": …}`: Base64 of a 16-byte IV followed by AES-256-CBC ciphertext with PKCS#7
    /// padding, under the key SHA-256(encrypt key).
    public static func decrypt(_ encrypted: String, encryptKey: String) throws(Failure) -> Data {
        guard let bytes = Data(base64Encoded: encrypted), bytes.count >= 32, bytes.count % 16 == 0 else {
            throw Failure(description: "the encrypted body is not Base64 of an IV and whole AES blocks")
        }
        do {
            let iv = try AES._CBC.IV(ivBytes: bytes.prefix(16))
            return try AES._CBC.decrypt(bytes.dropFirst(16), using: key(encryptKey), iv: iv)
        } catch {
            throw Failure(description: "the body does not decrypt with lark.encrypt_key")
        }
    }

    /// The counterpart of ``decrypt(_:encryptKey:)`` (the simulator's event sender uses it).
    public static func encrypt(_ plaintext: Data, encryptKey: String, iv: [UInt8]? = nil) throws -> String {
        let ivBytes = iv ?? (0..<16).map { _ in UInt8.random(in: 0...255) }
        let ciphertext = try AES._CBC.encrypt(plaintext, using: key(encryptKey), iv: try AES._CBC.IV(ivBytes: ivBytes))
        return (Data(ivBytes) + ciphertext).base64EncodedString()
    }

    /// `X-Lark-Signature`: lowercase hex of SHA-256(timestamp + nonce + encrypt key + the raw body bytes).
    public static func signature(timestamp: String, nonce: String, encryptKey: String, body: some DataProtocol) -> String {
        var hasher = SHA256()
        hasher.update(data: Data((timestamp + nonce + encryptKey).utf8))
        hasher.update(data: body)
        return hasher.finalize().lowercaseHex
    }

    /// Whether `signature` is the body's signature (compared in constant time).
    public static func verify(signature: String?, timestamp: String?, nonce: String?, encryptKey: String, body: some DataProtocol) -> Bool {
        guard let signature, let timestamp, let nonce else { return false }
        return constantTimeEqual(Array(signature.lowercased().utf8), Array(Self.signature(timestamp: timestamp, nonce: nonce, encryptKey: encryptKey, body: body).utf8))
    }

    private static func key(_ encryptKey: String) -> SymmetricKey {
        SymmetricKey(data: SHA256.hash(data: Data(encryptKey.utf8)))
    }
}
