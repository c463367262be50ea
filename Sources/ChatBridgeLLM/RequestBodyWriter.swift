import ChatBridgeCore
import NIOCore

/// Writes the chat completions request body straight into a buffer.
///
/// Measured with `chatbridge bench --profile` (open loop, 500/s, conversations of about 20 turns): Foundation's
/// `JSONEncoder` encoding this body was 3% of the server's CPU, the largest single JSON item. The body is a few
/// strings, numbers and flags, so it is written directly; `RequestBodyWriterTests` checks it decodes to the
/// same value as `JSONEncoder`'s output for every kind of character.
extension OpenAIChatModel.RequestBody {
    struct NotFinite: Error, CustomStringConvertible {
        var description: String { "llm.temperature must be a finite number" }
    }

    func json() throws -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.reserveCapacity(256 + messages.reduce(0) { $0 + $1.content.utf8.count + 32 })
        buffer.writeStaticString("{\"model\":")
        buffer.writeJSONString(model)
        buffer.writeStaticString(",\"messages\":[")
        for (index, message) in messages.enumerated() {
            if index > 0 { buffer.writeStaticString(",") }
            buffer.writeStaticString("{\"role\":")
            buffer.writeJSONString(message.role.rawValue)
            buffer.writeStaticString(",\"content\":")
            buffer.writeJSONString(message.content)
            buffer.writeStaticString("}")
        }
        buffer.writeStaticString("],\"stream\":")
        buffer.writeStaticString(stream ? "true" : "false")
        buffer.writeStaticString(",\"stream_options\":{\"include_usage\":")
        buffer.writeStaticString(stream_options.include_usage ? "true" : "false")
        buffer.writeStaticString("}")
        if let temperature {
            guard temperature.isFinite else { throw NotFinite() }
            buffer.writeStaticString(",\"temperature\":")
            buffer.writeString(temperature.description)
        }
        if let max_tokens {
            buffer.writeStaticString(",\"max_tokens\":")
            buffer.writeString(String(max_tokens))
        }
        if let user {
            buffer.writeStaticString(",\"user\":")
            buffer.writeJSONString(user)
        }
        buffer.writeStaticString("}")
        return buffer
    }
}

extension ByteBuffer {
    /// Writes `string` as a JSON string: quotes, backslashes and control characters escaped, everything else
    /// as its UTF-8 (valid JSON; U+2028 and U+2029 included).
    mutating func writeJSONString(_ string: String) {
        writeInteger(UInt8(ascii: "\""))
        var string = string
        string.withUTF8 { bytes in
            var start = 0
            for index in bytes.indices {
                let byte = bytes[index]
                guard byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") else { continue }
                if start < index { writeBytes(bytes[start..<index]) }
                switch byte {
                case UInt8(ascii: "\""): writeStaticString("\\\"")
                case UInt8(ascii: "\\"): writeStaticString("\\\\")
                case UInt8(ascii: "\n"): writeStaticString("\\n")
                case UInt8(ascii: "\r"): writeStaticString("\\r")
                case UInt8(ascii: "\t"): writeStaticString("\\t")
                default:
                    writeStaticString("\\u00")
                    writeInteger(Self.hexDigit(byte >> 4))
                    writeInteger(Self.hexDigit(byte & 0x0F))
                }
                start = index + 1
            }
            if start < bytes.count { writeBytes(bytes[start...]) }
        }
        writeInteger(UInt8(ascii: "\""))
    }

    private static func hexDigit(_ value: UInt8) -> UInt8 {
        value < 10 ? UInt8(ascii: "0") + value : UInt8(ascii: "a") + value - 10
    }
}
